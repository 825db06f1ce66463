"""Load with faults (slow): 64 streaming clients against one ``runner: graph`` replica, one Shard of its
graph SIGKILLed halfway. Every request ends, complete or with a clean error; the failures are only the
requests the kill or the replacement could reach; the replica is replaced and serves again.

What is asserted, and why:

- *Every request ends* within ``REQUEST_TIMEOUT_S`` (a read timeout that long, or a stream still
  open at the deadline, is a hang and fails the test). The clients send for ``LOAD_S`` and at least
  ``AFTER_S`` past ``t_back`` (below), at most ``RECOVERY_TIMEOUT_S`` past ``LOAD_S``: the whole
  test is bounded.
- *Each ends one of two ways*: **completed**, a 200 stream of chunks whose choice ends with
  ``finish_reason: "length"`` after exactly ``max_tokens`` tokens (``ignore_eos``; the usage chunk
  says so), then ``data: [DONE]``; or **failed cleanly**, a 200 stream whose last event before
  ``data: [DONE]`` is OpenAI's error object, or a non-200 response whose body is OpenAI's error
  object (``{"error": {"message", "type", ...}}``: the 503 of a replica whose engine is dead).
  Anything else (a cut stream, a stream without ``[DONE]``, a body that is not OpenAI's) fails.
- *Failures are bounded*: the kill happens at ``t_kill``; the replica serves again at ``t_back``,
  the first time after ``t_kill`` that ``/stats`` answers 200 from a new replica pid (polled every
  0.1 s by a watcher thread). A failed request must have been in flight at ``t_kill`` (sent before,
  ended after) or sent in ``[t_kill, t_back]``; none that ended before the kill or was sent after
  ``t_back`` may fail. At least one fails (the kill reached the engine).
- *It serves again*: requests sent after ``t_back`` complete, and a normal request at the end does.
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

from .conftest import MODEL, deploy, serve_on_a_free_port, wait_for

pytestmark = pytest.mark.slow

CLIENTS = 64
LOAD_S = 60.0  # clients send requests for at least this long; the shard is killed at half of it
AFTER_S = 8.0  # and until this long after the new replica serves (requests sent then must complete)
REQUEST_TIMEOUT_S = 60.0  # a request not ended by then hangs
RECOVERY_TIMEOUT_S = 90.0  # Serve must replace the replica within this
PROMPT_LENGTHS = (4, 32, 128, 300)  # tokens (the tiny model's context is 512)
MAX_TOKENS = (8, 32, 64, 128)
FAILURE_BACKOFF_S = 0.2  # a client that got a failure waits this long (no storm of 503s while the replica is down)


@dataclass
class Result:
    sent: float
    ended: float = 0.0
    outcome: str = ""  # "completed" | "failed" | "broken: ..." (what the test fails on)
    status: int = 0
    detail: str = ""
    tokens: int = 0


@dataclass
class Watch:
    """What the watcher thread saw: the replica's pid before the kill and when a new one answered."""

    old_pid: int
    t_kill: float | None = None
    t_back: float | None = None
    polls: list[tuple[float, int | None]] = field(default_factory=list)


def _is_openai_error(body: object) -> bool:
    return (
        isinstance(body, dict)
        and isinstance(body.get("error"), dict)
        and "message" in body["error"]
        and ("type" in body["error"])
    )


def _one_request(url: str, prompt: list[int], max_tokens: int) -> Result:
    result = Result(sent=time.monotonic())
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.8, "seed": 1,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    deadline = result.sent + REQUEST_TIMEOUT_S
    try:
        with requests.post(f"{url}/v1/completions", json=body, stream=True, timeout=(10, REQUEST_TIMEOUT_S)) as r:
            result.status = r.status_code
            if r.status_code != 200:
                try:
                    error = r.json()
                except ValueError:
                    error = None
                ok = _is_openai_error(error)
                result.outcome = "failed" if ok else f"broken: a {r.status_code} without OpenAI's error body"
                result.detail = (error["error"]["message"] if ok else r.text)[:200]
                return result
            events = []
            for line in r.iter_lines(decode_unicode=True):
                if time.monotonic() > deadline:
                    result.outcome = "broken: the stream outlived the request timeout"
                    return result
                if line:
                    events.append(line)
            result.outcome = _classify_stream(events, max_tokens, result)
    except requests.RequestException as exc:  # a read timeout (a hang) or a connection cut mid-stream
        result.outcome = f"broken: {type(exc).__name__}: {str(exc)[:200]}"
    finally:
        result.ended = time.monotonic()
    return result


def _classify_stream(events: list[str], max_tokens: int, result: Result) -> str:
    if not events or events[-1] != "data: [DONE]":
        return f"broken: the stream did not end with [DONE] (last: {events[-1:]!r})"
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    if payloads and _is_openai_error(payloads[-1]):
        result.detail = payloads[-1]["error"]["message"][:200]
        return "failed"
    finishes = [c["finish_reason"] for p in payloads for c in p.get("choices", []) if c.get("finish_reason")]
    usage = payloads[-1].get("usage") if payloads else None
    result.tokens = usage["completion_tokens"] if usage else 0
    if finishes == ["length"] and result.tokens == max_tokens:
        return "completed"
    return f"broken: finish_reasons {finishes}, {result.tokens} of {max_tokens} tokens, no error event"


def _client(url: str, seed: int, load_over, results: list[Result], lock: threading.Lock) -> None:  # noqa: ANN001
    rng = random.Random(seed)
    while not load_over():
        n = rng.choice(PROMPT_LENGTHS)
        result = _one_request(url, [rng.randrange(3, 300) for _ in range(n)], rng.choice(MAX_TOKENS))
        with lock:
            results.append(result)
        if result.outcome != "completed":
            time.sleep(FAILURE_BACKOFF_S)


def _stats(url: str) -> dict | None:
    try:
        r = requests.get(f"{url}/stats", timeout=5)
    except requests.RequestException:
        return None
    return r.json() if r.status_code == 200 else None


def _watch(url: str, watch: Watch, done: threading.Event) -> None:
    """Poll /stats every 0.1 s after the kill until a new replica pid answers."""
    while not done.is_set() and watch.t_back is None:
        if watch.t_kill is not None:
            stats = _stats(url)
            pid = stats["pid"] if stats else None
            watch.polls.append((time.monotonic(), pid))
            if pid is not None and pid != watch.old_pid:
                watch.t_back = time.monotonic()
        time.sleep(0.1)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def test_soak_with_a_shard_killed_halfway(ray_local, served_checkpoint: Path) -> None:  # noqa: ANN001
    from ray import serve

    with serve_on_a_free_port() as root:
        deploy(served_checkpoint, "soak", "/soak", runner="graph", parallel={"pp": 1, "ep": 2})
        url = f"{root}/soak"
        try:
            before = _stats(url)
            assert before is not None and set(before["actor_pids"]) == {"Stage(0)", "Shard(0)", "Shard(1)"}
            watch = Watch(old_pid=before["pid"])
            results: list[Result] = []
            lock, done = threading.Lock(), threading.Event()
            start = time.monotonic()
            stop_at = start + LOAD_S
            give_up = stop_at + RECOVERY_TIMEOUT_S  # no new replica by then: the clients stop, the test fails

            def load_over() -> bool:
                now = time.monotonic()
                back = watch.t_back is not None and now > watch.t_back + AFTER_S
                return now > give_up or (now > stop_at and back)

            threads = [threading.Thread(target=_client, args=(url, i, load_over, results, lock), daemon=True)
                       for i in range(CLIENTS)]  # fmt: skip
            watcher = threading.Thread(target=_watch, args=(url, watch, done), daemon=True)
            for t in [*threads, watcher]:
                t.start()

            time.sleep(LOAD_S / 2)
            os.kill(before["actor_pids"]["Shard(1)"], signal.SIGKILL)
            watch.t_kill = time.monotonic()
            for t in threads:
                t.join(timeout=max(0.0, give_up + REQUEST_TIMEOUT_S + 10 - time.monotonic()))
            assert not any(t.is_alive() for t in threads), "a client never finished its request"
            assert time.monotonic() - start < LOAD_S + RECOVERY_TIMEOUT_S + REQUEST_TIMEOUT_S + 10
            wait_for(lambda: watch.t_back is not None, timeout=RECOVERY_TIMEOUT_S, what="a new replica to serve")
            done.set()
            watcher.join(timeout=10)

            final = _one_request(url, list(range(3, 40)), 16)
            _report(results, watch, start)
            _check(results, watch)
            assert final.outcome == "completed", f"after the load: {final.outcome} {final.detail}"
        finally:
            serve.delete("soak")


def _report(results: list[Result], watch: Watch, start: float) -> None:
    completed = [r for r in results if r.outcome == "completed"]
    failed = [r for r in results if r.outcome == "failed"]
    latencies = [r.ended - r.sent for r in completed]
    kill, back = watch.t_kill - start, watch.t_back - start
    reached = [r for r in results if r.sent < watch.t_kill < r.ended]
    down = [r for r in results if watch.t_kill <= r.sent <= watch.t_back]
    span = max(r.ended for r in results) - start
    print(f"\nsoak: {len(results)} requests from {CLIENTS} streaming clients over {span:.0f} s; shard killed at "
          f"{kill:.1f} s, a new replica served at {back:.1f} s ({back - kill:.1f} s down)")  # fmt: skip
    print(f"  completed {len(completed)}, failed cleanly {len(failed)} (in flight at the kill: {len(reached)}, of "
          f"which failed {sum(r.outcome == 'failed' for r in reached)}; sent while down: "
          f"{len(down)}, of which failed {sum(r.outcome == 'failed' for r in down)}), "
          f"broken {len(results) - len(completed) - len(failed)}")  # fmt: skip
    print(f"  completed latency p50 {_percentile(latencies, 0.5):.2f} s, p99 {_percentile(latencies, 0.99):.2f} s; "
          f"{sum(r.tokens for r in completed)} tokens")  # fmt: skip
    statuses: dict[int, int] = {}
    for r in failed:
        statuses[r.status] = statuses.get(r.status, 0) + 1
    print(f"  failures by HTTP status (200: an error event in the stream): {statuses}")
    for r in failed[:1] + [r for r in failed if r.status != 200][:1]:
        print(f"  e.g. {r.status}: {r.detail}")


def _check(results: list[Result], watch: Watch) -> None:
    broken = [r for r in results if r.outcome.startswith("broken")]
    assert not broken, f"{len(broken)} requests did not end cleanly, e.g. {broken[0].outcome} ({broken[0].detail})"
    failed = [r for r in results if r.outcome == "failed"]
    assert failed, "the kill failed no request: it did not reach the engine"
    stray = [r for r in failed if not (r.sent < watch.t_kill < r.ended or watch.t_kill <= r.sent <= watch.t_back)]
    assert not stray, f"{len(stray)} failed requests were neither in flight at the kill nor sent while down, e.g. " + (
        f"sent {stray[0].sent - watch.t_kill:+.1f} s from the kill: {stray[0].detail}"
    )
    after = [r for r in results if r.sent > watch.t_back]
    assert after and all(r.outcome == "completed" for r in after)
