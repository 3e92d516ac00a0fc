"""Credentials, certificates and secret handling shared by the device tools, gateway and bridge.

- :mod:`tern.security.mosquitto_auth`: mosquitto password files (mosquitto's own ``$7$`` hash)
  and the ACL that lets a node speak only for itself.
- :mod:`tern.security.pki`: a small site CA, broker and client certificates (``cryptography``).
- :mod:`tern.security.secret_files`: writing files that hold secrets (mode 0600) and warning
  about ones readable by others.
- :mod:`tern.security.redact`: masking secrets in config dumps and log records.

Imports only :mod:`tern.core`: every product may use it.
"""
