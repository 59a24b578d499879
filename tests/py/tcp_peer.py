"""A TCP service for fedport's TCP tests; prints its port, then serves until killed.

  tcp_peer.py eof-echo   reads until the caller's half-close, then answers how many
                         bytes it read ("got N") and closes: only a half-close passed
                         on gets an answer
  tcp_peer.py reset      reads once, then resets the connection (SO_LINGER 0)
"""
import socket
import struct
import sys
import threading

mode = sys.argv[1]
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", 0))
srv.listen(64)
print(srv.getsockname()[1], flush=True)


def serve(c):
    if mode == "eof-echo":
        n = 0
        while True:
            d = c.recv(65536)
            if not d:
                break
            n += len(d)
        c.sendall(b"got %d" % n)
        c.close()
    else:
        c.recv(100)
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.close()


while True:
    c, _ = srv.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
