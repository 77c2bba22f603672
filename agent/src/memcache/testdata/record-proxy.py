# Logs every segment each side of a TCP connection receives: "<conn> <c|s> <ns> <hex>".
# Usage: python3 record-proxy.py <listen port> <memcached port> <transcript file>
import socket, threading, time, sys
LISTEN, UPSTREAM, OUT = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
lock = threading.Lock()
conn_id = [0]
def pump(src, dst, tag, cid, log):
    while True:
        try:
            data = src.recv(65536)
        except OSError:
            break
        if not data:
            break
        with lock:
            log.write(f"{cid} {tag} {time.monotonic_ns()} {data.hex()}\n"); log.flush()
        dst.sendall(data)
    try: dst.shutdown(socket.SHUT_WR)
    except OSError: pass
def main():
    log = open(OUT, "w")
    srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", LISTEN)); srv.listen(16)
    while True:
        c, _ = srv.accept()
        u = socket.create_connection(("127.0.0.1", UPSTREAM))
        conn_id[0] += 1
        cid = conn_id[0]
        threading.Thread(target=pump, args=(c, u, "c", cid, log), daemon=True).start()
        threading.Thread(target=pump, args=(u, c, "s", cid, log), daemon=True).start()
main()
