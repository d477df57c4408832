"""A signed binary cache on loopback for `drvkite pipeline --skip-cached`.

    make(work, drvmap_path, every=2) -> (cache_dir, public_key, cached, total)
    Server(cache_dir)  # context manager; .url is http://127.0.0.1:PORT

Nix signs the narinfos (`nix store sign --store file://…`), so the
signatures are Nix's own; the NAR files they name are not written, since
drvkite never fetches them. One target in `every` gets a narinfo for each
output; the others are missing (404), so the check sees hits and misses.

The server is asyncio with HTTP/1.1 keep-alive, the files held in memory:
Python's http.server (a thread and a new connection per request) would
measure itself rather than drvkite. Python 3 stdlib only.
"""

import asyncio
import os
import re
import subprocess
import threading

NIX = ["nix", "--extra-experimental-features", "nix-command"]
OUTPUT = re.compile(rb'\("([^"]+)","(/nix/store/[^"]+)","[^"]*","[^"]*"\)')
EMPTY_SHA256 = "sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73"


def output_paths(drv):
    """A .drv's output paths, from the outputs list that opens the file."""
    with open(drv, "rb") as f:
        text = f.read()
    head = text[: text.index(b")],") + 1]
    return [m.group(2).decode() for m in OUTPUT.finditer(head)]


def make(work, drvmap, every=2):
    import json

    cache = os.path.join(work, "cache")
    os.makedirs(cache, exist_ok=True)
    with open(os.path.join(cache, "nix-cache-info"), "w") as f:
        f.write("StoreDir: /nix/store\n")
    secret, public = os.path.join(work, "bench.sk"), os.path.join(work, "bench.pk")
    subprocess.run(
        ["nix-store", "--generate-binary-cache-key", "drvkite-bench-1", secret, public],
        check=True,
    )
    with open(drvmap) as f:
        entries = json.load(f)
    drvs = sorted({e["drvPath"] for e in entries.values()})
    paths = []
    for i, drv in enumerate(drvs):
        if i % every:
            continue
        for path in output_paths(drv):
            base = os.path.basename(path)
            with open(os.path.join(cache, base[:32] + ".narinfo"), "w") as f:
                f.write(
                    f"StorePath: {path}\nURL: nar/{base[:32]}.nar\nCompression: none\n"
                    f"FileHash: {EMPTY_SHA256}\nFileSize: 120\n"
                    f"NarHash: {EMPTY_SHA256}\nNarSize: 120\nReferences: \n"
                )
            paths.append(path)
    # One `nix store sign` per few thousand paths: the command line stays short.
    for start in range(0, len(paths), 2000):
        subprocess.run(
            NIX
            + ["store", "sign", "--store", f"file://{cache}", "--key-file", secret]
            + paths[start : start + 2000],
            check=True,
            stderr=subprocess.DEVNULL,
        )
    with open(public) as f:
        key = f.read().strip()
    return cache, key, len(range(0, len(drvs), every)), len(drvs)


class _Http(asyncio.Protocol):
    def __init__(self, files):
        self.files = files
        self.buf = b""

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head, self.buf = self.buf[:end], self.buf[end + 4 :]
            parts = head.split(b"\r\n", 1)[0].split(b" ")
            body = self.files.get(parts[1]) if len(parts) > 2 else None
            if body is None:
                self.transport.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
            else:
                self.transport.write(
                    b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
                )


class Server:
    """The cache folder over HTTP on 127.0.0.1, on a thread of its own."""

    def __init__(self, cache):
        self.files = {}
        for name in os.listdir(cache):
            path = os.path.join(cache, name)
            if os.path.isfile(path):
                with open(path, "rb") as f:
                    self.files[b"/" + name.encode()] = f.read()

    def __enter__(self):
        self.loop = asyncio.new_event_loop()
        started = threading.Event()

        def serve():
            asyncio.set_event_loop(self.loop)
            self.server = self.loop.run_until_complete(
                self.loop.create_server(
                    lambda: _Http(self.files), "127.0.0.1", 0, backlog=1024
                )
            )
            started.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=serve, daemon=True)
        self.thread.start()
        started.wait()
        port = self.server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        return False
