"""`serve` with port 0 for SMTP and HTTP: one `server.ready` line names the ports it bound,
before it tells systemd READY=1. Operators read the addresses there; the tests learn the
ports from it instead of probing a free port that another process may take first."""

from __future__ import annotations

import json
import urllib.request

from tests.support import Dialogue


def test_server_ready_names_the_ports_bound_for_port_0(serve_process):
    server = serve_process()  # smtp.port = 0, http.port = 0; returns after READY=1
    assert server.settings["smtp.port"] == 0 and server.settings["http.port"] == 0
    [ready] = server.events("server.ready")
    [smtp] = server.events("server.listening")
    [http] = server.events("http.listening")
    assert ready["smtp_port"] == smtp["port"] > 0 and ready["http_port"] == http["port"] > 0
    assert "dns_port" not in ready  # dns_server.listen is empty: no DNS listener
    events = [json.loads(line)["event"] for line in server.log().splitlines()
              if line.startswith("{")]
    assert events.index("server.ready") > max(events.index("server.listening"),
                                              events.index("http.listening"))

    dialogue = Dialogue.open(ready["smtp_port"], timeout=10)
    try:
        code, greeting = dialogue.reply()
        assert code == 220 and b"mx.test.local" in b"".join(greeting)
    finally:
        dialogue.close()
    with urllib.request.urlopen(f"http://127.0.0.1:{ready['http_port']}/health",
                                timeout=10) as response:
        assert response.status == 200
