#!/usr/bin/env python3
"""A TCP proxy a test can cut: cut_proxy.py LISTEN_PORT TARGET_PORT CUT_FILE READY_FILE.

Forwards every connection to 127.0.0.1:TARGET_PORT. While CUT_FILE exists, bytes in both directions
vanish and nobody is told (a partition: connections stay open, nothing gets through). Writes READY_FILE
once listening."""
import os
import socket
import sys
import threading

listen_port, target_port, cut_file, ready_file = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("127.0.0.1", listen_port))
server.listen(16)
open(ready_file, "w").close()


def pump(source, sink):
    while True:
        try:
            data = source.recv(65536)
        except OSError:
            break
        if not data:
            break
        if os.path.exists(cut_file):
            continue
        try:
            sink.sendall(data)
        except OSError:
            break
    try:
        sink.shutdown(socket.SHUT_WR)
    except OSError:
        pass


while True:
    client, _ = server.accept()
    try:
        target = socket.create_connection(("127.0.0.1", target_port))
    except OSError:
        client.close()
        continue
    for end in (client, target):
        end.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    threading.Thread(target=pump, args=(client, target), daemon=True).start()
    threading.Thread(target=pump, args=(target, client), daemon=True).start()
