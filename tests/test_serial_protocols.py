"""Property tests of the serial protocol parsers: the firmware's own modules (pure Python,
run here under CPython) against the host's encoders and decoders in tern.core.sensor_protocols.

Streams are built from valid frames and broken ones (every breakage of the simulator), cut
into random chunks as a UART delivers them. The firmware parser must find exactly the good
frames, count each broken stretch once, never raise and never grow its buffer.
"""

from __future__ import annotations

import random
import types

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tern.core.sensor_protocols import (
    PMSFrame,
    PMSStream,
    ProtocolError,
    decode_nmea,
    decode_pms,
    decode_sht3x,
    encode_gga,
    encode_pms,
    encode_rmc,
    encode_sht3x,
    sht_crc8,
)
from tern.device.emulate import firmware_dir
from tern.device.serial_sim import BREAKAGES, break_frame
from tern.edge.serial_sensors import _NMEALines

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def firmware_module(name: str) -> types.ModuleType:
    """A firmware module loaded under CPython (no __pycache__ among the board's files)."""
    path = firmware_dir() / f"{name}.py"
    module = types.ModuleType(f"_fw_{name}")
    exec(compile(path.read_text(), str(path), "exec"), module.__dict__)
    return module


tern_pms = firmware_module("tern_pms")
tern_nmea = firmware_module("tern_nmea")
tern_sht3x = firmware_module("tern_sht3x")

u16 = st.integers(0, 999)
pms_frames = st.builds(PMSFrame, u16, u16, u16, counts=st.tuples(*[st.integers(0, 9999)] * 6))
breakage = st.one_of(st.none(), st.sampled_from(BREAKAGES))


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` split at the given (sorted, deduplicated) offsets."""
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, last = [], 0
    for p in points + [len(data)]:
        out.append(data[last:p])
        last = p
    return out


def feed(parser, chunks: list[bytes]) -> None:
    for chunk in chunks:
        buf = bytearray(64)
        for i in range(0, len(chunk), 64):  # the firmware reads a 64-byte chunk at a time
            part = chunk[i : i + 64]
            buf[: len(part)] = part
            parser.feed(buf, len(part))


@SETTINGS
@given(st.lists(st.tuples(pms_frames, breakage), min_size=1, max_size=12), st.lists(st.integers(0, 10**6), max_size=20),
       st.integers(0, 2**32))
def test_pms_stream_finds_every_good_frame_and_counts_every_broken_one(items, cuts, seed) -> None:
    rng = random.Random(seed)
    stream = b""
    good: list[PMSFrame] = []
    broken = 0
    for frame, how in items:
        if how is not None:  # a broken frame, then the sensor's next (good) one
            stream += break_frame(encode_pms(frame), how, "pms5003", rng)
            broken += 1
        stream += encode_pms(frame)
        good.append(frame)
    parser = tern_pms.PMSParser()
    feed(parser, chunked(stream, cuts))
    assert (parser.good, parser.bad) == (len(good), broken)
    assert parser.vals == [good[-1].pm1_0, good[-1].pm2_5, good[-1].pm10]
    assert parser.n == 0
    host = PMSStream()
    assert [f.values() for f in host.feed(stream)] == [f.values() for f in good]
    assert (host.good, host.bad) == (len(good), broken)


@SETTINGS
@given(st.binary(max_size=300), pms_frames)
def test_pms_parser_survives_any_bytes_and_resyncs(noise, frame) -> None:
    parser = tern_pms.PMSParser()
    parser.feed(noise)  # never raises
    assert 0 <= parser.n <= tern_pms.FRAME_LEN
    parser.feed(encode_pms(frame))
    parser.feed(encode_pms(frame))
    assert parser.vals == [frame.pm1_0, frame.pm2_5, frame.pm10]
    assert parser.bad <= 1 + len(noise) // 2


lat = st.floats(-89.99, 89.99, allow_nan=False)
lon = st.floats(-179.99, 179.99, allow_nan=False)
gps_fix = st.tuples(lat, lon, st.floats(-100, 5000), st.integers(0, 24), st.floats(0, 200))


def gps_sentences(fix) -> list[bytes]:
    la, lo, alt, sats, speed = fix
    return [encode_gga(la, lo, alt, sats), encode_rmc(la, lo, speed)]


@SETTINGS
@given(st.lists(st.tuples(gps_fix, breakage), min_size=1, max_size=8), st.lists(st.integers(0, 10**6), max_size=20),
       st.integers(0, 2**32))
def test_nmea_stream_finds_every_good_sentence_and_counts_every_broken_one(items, cuts, seed) -> None:
    rng = random.Random(seed)
    stream = b""
    broken = good = 0
    for fix, how in items:
        sentences = gps_sentences(fix)
        if how is not None:
            stream += break_frame(sentences[0], how, "nmea", rng)
            broken += 1
        stream += b"".join(sentences)
        good += len(sentences)
    parser = tern_nmea.NMEAParser()
    feed(parser, chunked(stream, cuts))
    assert (parser.good, parser.bad) == (good, broken)
    want: dict = {}
    for sentence in gps_sentences(items[-1][0]):
        want.update(decode_nmea(sentence)[1])
    out: dict = {}
    parser.fill(tern_nmea.NAMES, out)
    assert set(out) == set(want)
    for key, value in want.items():
        assert out[key] == pytest.approx(value, abs=1e-9), key
    la, lo = items[-1][0][:2]
    assert out["lat"] == pytest.approx(la, abs=2e-6) and out["lon"] == pytest.approx(lo, abs=2e-6)
    # The Pi's reader (edge/serial_sensors.py) agrees: one fix per GGA, the same bad count.
    host = _NMEALines()
    fixes = [f for chunk in chunked(stream, cuts) for f in host.feed(chunk)]
    assert len(fixes) == len(items) and host.bad == broken and host.good == good
    assert fixes[-1]["lat"] == pytest.approx(out["lat"], abs=1e-9)


@SETTINGS
@given(st.binary(max_size=400), gps_fix)
def test_nmea_parser_survives_any_bytes_and_resyncs(noise, fix) -> None:
    parser = tern_nmea.NMEAParser()
    parser.feed(noise)
    assert parser.n <= tern_nmea.LINE_MAX
    for sentence in gps_sentences(fix):
        parser.feed(sentence)
    out: dict = {}
    parser.fill(tern_nmea.NAMES, out)
    assert out["lat"] == pytest.approx(fix[0], abs=2e-6) and out["sats"] == fix[3]


def test_nmea_known_sentences_and_rejections() -> None:
    # The classic example sentence from the NMEA references (checksum 47 is right).
    kind, values = decode_nmea(b"$GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,*47\r\n")
    assert kind == "GGA" and values == pytest.approx({"lat": 48.1173, "lon": 11.516666666666667, "alt_m": 545.4, "sats": 8, "fix": 1})
    parser = tern_nmea.NMEAParser()
    parser.feed(b"$GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,*47\r\n")
    assert (parser.good, parser.lat, parser.alt) == (1, pytest.approx(48.1173), 545.4)
    for bad in (b"$GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,*48",
                b"$GPGGA,123519,48x7.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,*47",
                b"GPGGA,123519*47", b"$GPRMC,1,X,,,,,,,,,,*00"):
        with pytest.raises(ProtocolError):
            decode_nmea(bad)


@SETTINGS
@given(pms_frames)
def test_pms_host_codec_round_trip_and_checksum(frame) -> None:
    raw = encode_pms(frame)
    assert len(raw) == 32 and raw[:4] == b"\x42\x4d\x00\x1c"
    assert decode_pms(raw) == PMSFrame(frame.pm1_0, frame.pm2_5, frame.pm10, (frame.pm1_0, frame.pm2_5, frame.pm10), frame.counts)
    for how in ("checksum", "wrong_length"):
        with pytest.raises(ProtocolError):
            decode_pms(break_frame(raw, how, "pms5003", random.Random(1)).ljust(32, b"\0")[:32])


@SETTINGS
@given(st.floats(-45, 130), st.floats(0, 100), st.integers(0, 5), st.integers(0, 7))
def test_sht3x_round_trip_and_any_single_bit_flip_is_caught(celsius, rh, byte, bit) -> None:
    raw = encode_sht3x(celsius, rh)
    t, h = decode_sht3x(raw)
    assert t == pytest.approx(celsius, abs=0.01) and h == pytest.approx(rh, abs=0.01)
    spoiled = bytearray(raw)
    spoiled[byte] ^= 1 << bit
    with pytest.raises(ProtocolError):
        decode_sht3x(bytes(spoiled))


def test_sht3x_crc_datasheet_example() -> None:
    assert sht_crc8(b"\xbe\xef") == 0x92 == tern_sht3x.sht_crc8(b"\xbe\xef")


def _sht_words(words: tuple[int, int]) -> bytes:
    out = b""
    for w in words:
        out += w.to_bytes(2, "big") + bytes([sht_crc8(w.to_bytes(2, "big"))])
    return out


@SETTINGS
@given(st.one_of(st.binary(min_size=6, max_size=6), st.tuples(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF)).map(_sht_words)))
def test_firmware_sht3x_decoder_agrees_with_the_host_on_any_six_bytes(raw) -> None:
    try:
        want = decode_sht3x(raw)
    except ProtocolError:
        with pytest.raises(ValueError):
            tern_sht3x.sht_decode(raw)
        return
    assert tern_sht3x.sht_decode(raw) == pytest.approx(want, abs=0.006)
