"""Keys and safe defaults (docs/security.md):

    keys.py   CurveZMQ key files and directories: creating, reading, authorizing, revoking
    bind.py   the dispatcher refuses a non-loopback address without keys unless told insecure

The dispatcher's access control (ZAP handler, roles, quarantine) is conveyor/dispatcher/access.py.
"""
