"""ZeroMQ sockets, set up in one place for the dispatcher, the worker and the client:

    sockets.py     sending multipart messages cheaply; a DEALER's keys and frame limit
    handshake.py   a DEALER's handshake, watched, so a refused key ends in a clear AccessDenied
    shm.py         large arguments through /dev/shm between peers on one host
"""
