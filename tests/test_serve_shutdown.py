"""``loraswap serve`` stops cleanly on SIGTERM, with Ray's own signal handling in the way (no Ray started here).

On SIGTERM Ray's core worker, in C, logs and arms a 3 s alarm whose handler aborts the process (a watchdog for
a crash that hangs); Ray's Python start-up also puts in a SIGTERM handler of its own. A server whose shutdown
took longer than the alarm (an image pipeline's) exited with SIGABRT (134). Here the alarm is armed with the
signal, as Ray does, and the shutdown is slower than it.
"""

from __future__ import annotations

import os
import signal
import threading
import time

from loraswap.serve import app, ray_local

ALARM_S = 1


def test_sigterm_stops_the_server_after_a_slow_shutdown_without_the_abort_alarm(monkeypatch, capsys):
    events = []
    returned = threading.Event()

    def start_serving(*_args, **_kwargs) -> None:
        signal.signal(signal.SIGTERM, lambda *_: events.append("ray's own handler"))  # what Ray's start-up does
        events.append("serving")

    def terminate_like_ray() -> None:
        time.sleep(0.2)  # the server is waiting by now
        signal.alarm(ALARM_S)  # Ray's C handler arms it when SIGTERM arrives
        os.kill(os.getpid(), signal.SIGTERM)
        if not returned.wait(10):  # SIGTERM did not stop it: end the wait, and the assertions say why
            os.kill(os.getpid(), signal.SIGINT)

    def slow_stop() -> None:
        time.sleep(ALARM_S + 0.5)
        events.append("stopped")

    monkeypatch.setattr(app, "build_app", lambda *args, **kwargs: "app")
    monkeypatch.setattr(ray_local, "start_local_ray", lambda: None)
    monkeypatch.setattr(ray_local, "stop_ray", slow_stop)
    monkeypatch.setattr(app.serve, "start", lambda **kwargs: None)
    monkeypatch.setattr(app.serve, "run", start_serving)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    previous_alarm = signal.signal(signal.SIGALRM, lambda *_: events.append("aborted"))
    try:
        threading.Thread(target=terminate_like_ray).start()
        app.serve_forever("model", "adapters", port=8123)
    finally:
        returned.set()
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous_alarm)
    assert events == ["serving", "stopped"]  # the alarm disarmed; our handler, not Ray's, took the signal
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers
    out = capsys.readouterr().out
    assert "ready at http://127.0.0.1:8123/v1" in out and "shutting down" in out
