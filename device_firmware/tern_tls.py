# Tern node TLS to the broker (config tls_ca): the CA file on flash, the context made from it,
# the handshake. A module of its own, compiled only by nodes that use TLS.
import os

# A CA file holds the site CA, maybe an intermediate: anything bigger is not meant for a node.
_CA_MAX = 8192


def ca_certs(data):
    """The DER certificates of a CA file: each PEM CERTIFICATE block decoded, or the file as it
    is when it is DER. (MicroPython's own mbedtls config parses DER only.)"""
    if b"-----BEGIN" not in data:
        return [data]
    from binascii import a2b_base64
    out = []
    b64 = None
    for line in data.split(b"\n"):
        line = line.strip()
        if line.startswith(b"-----BEGIN CERTIFICATE"):
            b64 = []
        elif line.startswith(b"-----END"):
            if b64 is not None:
                out.append(a2b_base64(b"".join(b64)))
            b64 = None
        elif b64 is not None:
            b64.append(line)
    return out


def context(ca):
    """A TLS client context that accepts only a broker certificate signed by the CA file ``ca``
    on flash. Raises OSError naming the file when it cannot be used."""
    try:
        import tls
    except ImportError:
        try:
            import ssl as tls   # MicroPython before 1.23 named the module ssl
        except ImportError:
            raise OSError("tls_ca is set but this MicroPython has no tls module")
    try:
        if os.stat(ca)[6] > _CA_MAX:
            raise ValueError("more than %d bytes" % _CA_MAX)
        with open(ca, "rb") as f:
            certs = ca_certs(f.read())
        if not certs:
            raise ValueError("no certificate in it")
        ctx = tls.SSLContext(tls.PROTOCOL_TLS_CLIENT)
        ctx.verify_mode = tls.CERT_REQUIRED
        for der in certs:
            ctx.load_verify_locations(der)   # (each call adds to the trusted CAs)
    except (OSError, ValueError) as e:
        raise OSError("tls_ca %s: %s %s" % (ca, type(e).__name__, e))
    return ctx


def wrap(ctx, sock, host):
    """TLS over the connected ``sock``: the broker must show a certificate signed by the CA
    for ``host`` (the config's broker, a name or an address). Raises OSError in one line."""
    try:
        return ctx.wrap_socket(sock, server_hostname=host)
    except ValueError as e:   # the certificate was refused (mbedtls says why, over three lines)
        raise OSError("TLS: broker certificate refused: %s (check tls_ca, and that the certificate "
                      "names the broker as configured)" % " ".join(str(e).split()))
    except OSError as e:
        raise OSError("TLS handshake failed: %s" % (e,))
