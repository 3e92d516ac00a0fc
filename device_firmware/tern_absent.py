# A sensor whose driver could not start (no bus, no port): kept in the sensor list so that
# it reads as down in every reading and in the node's status. Imported only when one fails.


class AbsentSensor:
    def __init__(self, spec, error):
        kind = spec.get("type")
        # The label the driver would have given itself (see each driver in tern_sensors).
        self.label = (spec.get("label") or spec.get("name") or spec.get("protocol")
                      or {"adc": "adc_mv", "tmp102": "temp_c", "uart": "pms5003"}.get(kind) or kind or "sensor")
        self.error = str(error)[:40]

    def poll(self):
        pass

    def read(self, out):
        raise OSError(self.error)
