#!/usr/bin/env python3
"""Render conf/grafana/llm-edge.json into one PNG from a real Prometheus.

Grafana is not needed: this reads the dashboard's panels (gridPos, title, unit,
targets[].expr and legendFormat), substitutes its variables ($job, $model,
$__rate_interval, ...), asks Prometheus' HTTP API for the data (query_range for
time series; an instant query for the big number of a stat panel and for the
bars of a bar gauge) and draws the panels where the dashboard's 24-column grid
puts them, in a dark theme close to Grafana's. A panel whose queries return
nothing says "No data". Grafana itself draws it somewhat differently (fonts,
axes, tooltips, legends); the numbers are the same queries'.

It is a development tool (the README's screenshot), not used by the tests or CI.
It needs matplotlib, in a virtual environment of its own, e.g.

    python3 -m venv /tmp/render-venv && /tmp/render-venv/bin/pip install matplotlib

Two ways to run it:

    # against a Prometheus you have, which scrapes llm-edge as job "llm-edge"
    /tmp/render-venv/bin/python scripts/render-dashboard.py \\
        --prometheus http://127.0.0.1:9090 --minutes 30 --out /tmp/dashboard.png

    # the README's image: scripts/dashboard-demo.sh runs this script's `demo`
    # mode, which starts a real llama-server, llm-edge and Prometheus on
    # loopback, drives a few minutes of traffic and renders docs/dashboard.png
    RENDER_PYTHON=/tmp/render-venv/bin/python scripts/dashboard-demo.sh

Everything it starts listens on 127.0.0.1 only, on free ports, under a
temporary directory, and is killed at the end (also on Ctrl-C); every wait and
every loop is bounded.
"""

import argparse
import collections
import datetime as dt
import hashlib
import http.client
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))

# ---------------------------------------------------------------- Prometheus


def prom_get(base, path, params, timeout=20):
    url = f"{base.rstrip('/')}{path}?{urllib.parse.urlencode(params)}"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            body = json.load(resp)
    except urllib.error.HTTPError as e:
        body = json.loads(e.read() or b"{}")
    if body.get("status") != "success":
        raise RuntimeError(f"Prometheus refused {params.get('query')!r}: {body.get('error')}")
    return body["data"]


def substitute(expr, variables):
    """Grafana's $name / ${name} / ${name:format} / [[name]] for the given variables."""

    def repl(m):
        name = m.group(1) or m.group(2) or m.group(3)
        return variables.get(name, m.group(0))

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]", repl, expr)


def legend(fmt, labels):
    if not fmt:
        inner = ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items()) if k != "__name__")
        return f"{{{inner}}}" if inner else labels.get("__name__", "value")
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt).strip()


def _num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def fetch_panel(base, panel, variables, start, end, step):
    """[(legend, [t...], [v...], instant_value)] for the panel's targets."""
    series = []
    for target in panel.get("targets", []):
        if target.get("hide") or not target.get("expr"):
            continue
        expr = substitute(target["expr"], variables)
        fmt = target.get("legendFormat", "")
        rng = prom_get(base, "/api/v1/query_range", {"query": expr, "start": start, "end": end, "step": step})
        inst = {}
        if panel["type"] in ("stat", "gauge", "bargauge"):
            for r in prom_get(base, "/api/v1/query", {"query": expr, "time": end})["result"]:
                inst[legend(fmt, r["metric"])] = _num(r["value"][1])
        found = []
        for r in rng["result"]:
            name = legend(fmt, r["metric"])
            # Prometheus leaves out the steps without a value: put gaps there
            values = {int(round(float(t))): _num(v) for t, v in r["values"]}
            ts = [start + i * step for i in range(int((end - start) // step) + 1)]
            vs = [values.get(int(round(t)), math.nan) for t in ts]
            if all(math.isnan(v) for v in vs) and name not in inst:
                continue
            found.append((name, ts, vs, inst.get(name, math.nan)))
        names = {s[0] for s in found}
        found += [(name, [], [], v) for name, v in inst.items() if name not in names]
        # the targets in their order; a target's series sorted by legend (codes numerically)
        series += sorted(found, key=lambda s: (0, float(s[0]), s[0]) if re.fullmatch(r"\d+(\.\d+)?", s[0]) else (1, 0, s[0]))
    return series


# ---------------------------------------------------------------- units


def _trim(x, decimals):
    s = f"{x:.{decimals}f}"
    return s.rstrip("0").rstrip(".") if "." in s else s


def _dec(x):
    ax = abs(x)
    return 0 if ax >= 100 or ax == 0 else 1 if ax >= 10 else 2


def fmt_value(v, unit, decimals=None):
    if v is None or math.isnan(v):
        return "-"
    if unit == "bool":
        return "True" if v else "False"
    if unit == "percentunit":
        p = v * 100
        return f"{_trim(p, decimals if decimals is not None else _dec(p))}%"
    if unit == "s":
        if v == 0:
            return "0 s"
        for scale, suffix in ((3600, " h"), (60, " min"), (1, " s"), (1e-3, " ms"), (1e-6, " µs")):
            if abs(v) >= scale or scale == 1e-6:
                x = v / scale
                return _trim(x, decimals if decimals is not None else _dec(x)) + suffix
    if unit in ("bytes", "decbytes", "Bps"):
        base, names = (1024, ["B", "KiB", "MiB", "GiB", "TiB"]) if unit == "bytes" else (1000, ["B", "kB", "MB", "GB", "TB"])
        i = 0
        while abs(v) >= base and i < len(names) - 1:
            v /= base
            i += 1
        s = _trim(v, decimals if decimals is not None else _dec(v)) + " " + names[i]
        return s + "/s" if unit == "Bps" else s
    suffix = {"reqps": " req/s", "ops": " ops/s", "short": "", "none": ""}.get(unit, "")
    x, si = v, ""
    for scale, name in ((1e9, " Bil"), (1e6, " Mil"), (1e3, " K")):
        if abs(v) >= scale:
            x, si = v / scale, name
            break
    return _trim(x, decimals if decimals is not None else _dec(x)) + si + suffix


# ---------------------------------------------------------------- drawing

BG = "#111217"
PANEL = "#181b1f"
BORDER = "#2a2d33"
GRID = "#26292e"
TEXT = "#ccccdc"
MUTED = "#8e8e99"
# Grafana's classic palette
PALETTE = ["#7eb26d", "#eab839", "#6ed0e0", "#ef843c", "#e24d42", "#1f78c1", "#ba43a9", "#705da0",
           "#508642", "#cca300", "#447ebc", "#c15c17", "#890f02", "#0a437c", "#6d1f62", "#584477"]
THRESH = {"green": "#73bf69", "orange": "#ff9830", "red": "#f2495c", "yellow": "#fade2a", "blue": "#5794f2"}


def threshold_color(v, defaults):
    steps = (defaults.get("thresholds") or {}).get("steps") or [{"color": "green", "value": None}, {"color": "red", "value": 80}]
    color = steps[0]["color"]
    for s in steps[1:]:
        if s.get("value") is not None and not math.isnan(v) and v >= s["value"]:
            color = s["color"]
    return THRESH.get(color, color)


class Canvas:
    """Pixel coordinates (origin top-left) on a matplotlib figure."""

    def __init__(self, fig, width, height):
        self.fig, self.W, self.H = fig, width, height

    def rect(self, x, y, w, h):  # -> figure fraction [left, bottom, width, height]
        return [x / self.W, 1 - (y + h) / self.H, w / self.W, h / self.H]

    def text(self, x, y, s, **kw):
        kw.setdefault("color", TEXT)
        kw.setdefault("va", "top")
        return self.fig.text(x / self.W, 1 - y / self.H, s, **kw)

    def box(self, x, y, w, h, color, edge=None, radius=3):
        from matplotlib.patches import FancyBboxPatch

        p = FancyBboxPatch((x / self.W, 1 - (y + h) / self.H), w / self.W, h / self.H,
                           boxstyle=f"round,pad=0,rounding_size={radius / self.W}",
                           transform=self.fig.transFigure, facecolor=color,
                           edgecolor=edge or color, linewidth=1, zorder=-1)
        self.fig.patches.append(p)


def text_px(s, size):
    """Rough width in pixels of `s` in DejaVu Sans at `size` points (dpi 100)."""
    return len(s) * size * 0.8


def draw_no_data(cv, x, y, w, h):
    cv.text(x + w / 2, y + h / 2, "No data", ha="center", va="center", fontsize=13, color=MUTED)


def draw_timeseries(cv, panel, data, x, y, w, h, start, end):
    import matplotlib.dates as mdates
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "short")
    series = [s for s in data if s[1] and not all(math.isnan(v) for v in s[2])]
    if not series:
        draw_no_data(cv, x, y + 12, w, h - 12)
        return
    # legend rows (Grafana's list legend, at the bottom)
    items, rows, cur = [], 1, 0
    for i, (name, *_rest) in enumerate(series):
        iw = 22 + text_px(name, 8.5) + 18
        if cur + iw > w - 16 and cur > 0:
            rows, cur = rows + 1, 0
        items.append((rows, cur, name, PALETTE[i % len(PALETTE)]))
        cur += iw
    leg_h = rows * 17 + 4
    left, right, top, bottom = 62, 14, 32, 22 + leg_h
    ax = cv.fig.add_axes(cv.rect(x + left, y + top, w - left - right, h - top - bottom))
    ax.set_facecolor(PANEL)
    for sp in ax.spines.values():
        sp.set_visible(False)
    tz = dt.timezone.utc
    lo, hi = math.inf, -math.inf
    for i, (name, ts, vs, _inst) in enumerate(series):
        color = PALETTE[i % len(PALETTE)]
        xs = [dt.datetime.fromtimestamp(t, tz) for t in ts]
        clean = [v if not math.isinf(v) else math.nan for v in vs]
        ax.plot(xs, clean, color=color, linewidth=1.4, solid_joinstyle="round")
        ax.fill_between(xs, clean, 0, color=color, alpha=0.07, linewidth=0)
        finite = [v for v in clean if not math.isnan(v)]
        if finite:
            lo, hi = min(lo, min(finite)), max(hi, max(finite))
    if lo >= 0:
        ax.set_ylim(bottom=0, top=hi * 1.12 if hi > 0 else 1)
    if unit == "percentunit" and hi <= 1:
        ax.set_ylim(0, max(hi * 1.12, 0.01))
    ax.set_xlim(dt.datetime.fromtimestamp(start, tz), dt.datetime.fromtimestamp(end, tz))
    ax.yaxis.set_major_locator(MaxNLocator(nbins=max(2, int((h - top - bottom) / 40)), min_n_ticks=2))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _p: fmt_value(v, unit)))
    ax.xaxis.set_major_locator(mdates.AutoDateLocator(minticks=3, maxticks=max(3, int(w / 110)), tz=tz))
    ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M" if end - start > 900 else "%H:%M:%S", tz=tz))
    ax.tick_params(colors=MUTED, labelsize=8, length=0, pad=4)
    ax.grid(True, color=GRID, linewidth=0.8)
    ax.set_axisbelow(True)
    ly = y + h - leg_h - 2
    for row, cx, name, color in items:
        yy = ly + (row - 1) * 17 + 9
        cv.fig.add_artist(__import__("matplotlib").lines.Line2D(
            [(x + 10 + cx) / cv.W, (x + 24 + cx) / cv.W], [1 - yy / cv.H] * 2,
            color=color, linewidth=3, solid_capstyle="round", transform=cv.fig.transFigure))
        cv.text(x + 30 + cx, yy, name, fontsize=8.5, va="center", color=TEXT)


def draw_stat(cv, panel, data, x, y, w, h, start, end):
    defaults = panel.get("fieldConfig", {}).get("defaults", {})
    unit = defaults.get("unit", "short")
    vals = [(n, ts, vs, v if not math.isnan(v) else next((u for u in reversed(vs) if not math.isnan(u)), math.nan))
            for n, ts, vs, v in data]
    vals = [s for s in vals if not math.isnan(s[3])]
    if not vals:
        draw_no_data(cv, x, y + 12, w, h - 12)
        return
    n = len(vals)
    cell_w, top = w / n, y + 30
    cell_h = h - 30
    for i, (name, ts, vs, v) in enumerate(vals):
        cx = x + i * cell_w
        color = threshold_color(v, defaults)
        # sparkline (Grafana's graphMode "area"), in the lower part
        finite = [(t, u) for t, u in zip(ts, vs) if not math.isnan(u)]
        if len(finite) > 1 and panel.get("options", {}).get("graphMode", "area") != "none":
            ax = cv.fig.add_axes(cv.rect(cx + 1, top + cell_h * 0.55, cell_w - 2, cell_h * 0.45 - 2))
            ax.axis("off")
            t, u = zip(*finite)
            ax.plot(t, u, color=color, linewidth=1.2, alpha=0.9)
            ax.fill_between(t, u, min(min(u), 0), color=color, alpha=0.18, linewidth=0)
            ax.set_xlim(start, end)
            lo, hi = min(min(u), 0), max(u)
            ax.set_ylim(lo, hi + (hi - lo) * 0.1 if hi > lo else lo + 1)
        big = 40 if n == 1 else max(18, min(34, int(cell_w / 7)))
        label_y = top + cell_h * 0.18
        if n > 1:
            cv.text(cx + cell_w / 2, label_y, name, ha="center", va="center", fontsize=9.5, color=TEXT)
        cv.text(cx + cell_w / 2, top + cell_h * (0.42 if n > 1 else 0.36), fmt_value(v, unit), ha="center",
                va="center", fontsize=big, color=color)


def draw_bargauge(cv, panel, data, x, y, w, h, start, end):
    import numpy as np

    defaults = panel.get("fieldConfig", {}).get("defaults", {})
    unit = defaults.get("unit", "short")
    lo, hi = defaults.get("min", 0), defaults.get("max", 1)
    vals = [(n, v if not math.isnan(v) else next((u for u in reversed(vs) if not math.isnan(u)), math.nan))
            for n, ts, vs, v in data]
    vals = [s for s in vals if not math.isnan(s[1])]
    if not vals:
        draw_no_data(cv, x, y + 12, w, h - 12)
        return
    from matplotlib.colors import to_rgb

    steps = (defaults.get("thresholds") or {}).get("steps") or [{"color": "green", "value": None}]

    def color_at(f):  # the threshold colour at a fraction of min..max
        c = steps[0]["color"]
        for st in steps[1:]:
            if st.get("value") is not None and lo + f * (hi - lo) >= st["value"]:
                c = st["color"]
        return to_rgb(THRESH.get(c, c))

    area_y, area_h = y + 36, h - 46
    slot = min(area_h / len(vals), 64)
    for i, (name, v) in enumerate(vals):
        by = area_y + i * slot
        cv.text(x + 12, by + 2, name, fontsize=9.5, color=TEXT)
        bar_y, bar_h = by + 19, max(8, slot - 28)
        bar_x, bar_w = x + 12, w - 24 - 80
        cv.box(bar_x, bar_y, bar_w, bar_h, "#22252b", radius=2)
        frac = max(0.0, min(1.0, (v - lo) / (hi - lo)))
        if frac > 0:
            ax = cv.fig.add_axes(cv.rect(bar_x, bar_y, max(bar_w * frac, 2), bar_h))
            ax.axis("off")
            # Grafana's "gradient" mode: the thresholds' colours, brightening towards the value
            n = 256
            img = np.array([[(*color_at(frac * i / (n - 1)), 0.45 + 0.55 * i / (n - 1)) for i in range(n)]])
            ax.imshow(img, aspect="auto", extent=(0, 1, 0, 1), interpolation="bilinear")
        cv.text(x + w - 12, bar_y + bar_h / 2, fmt_value(v, unit), ha="right", va="center", fontsize=15,
                color=threshold_color(v, defaults))


def render(dashboard_path, prometheus, out, start, end, step, variables, width=1800, row_px=28,
           subtitle="", dpi=100, colors=256):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(dashboard_path) as f:
        dash = json.load(f)
    panels = [p for p in dash["panels"] if "gridPos" in p]
    for p in panels:  # panels inside a collapsed row come too
        panels.extend(q for q in p.get("panels", []) if "gridPos" in q)
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    margin, gap, header = 12, 8, 58
    col = (width - 2 * margin + gap) / 24
    height = int(header + rows * row_px + margin)
    fig = plt.figure(figsize=(width / dpi, height / dpi), dpi=dpi, facecolor=BG)
    cv = Canvas(fig, width, height)
    cv.text(margin, 14, dash.get("title", "dashboard"), fontsize=15, fontweight="bold")
    span = dt.datetime.fromtimestamp(start, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S") + " to " + \
        dt.datetime.fromtimestamp(end, dt.timezone.utc).strftime("%H:%M:%S UTC")
    shown = "   ".join(f"{k} = {v}" for k, v in variables.items() if not k.startswith("__") and k != "datasource")
    cv.text(margin, 38, f"{shown}   ·   {span}" + (f"   ·   {subtitle}" if subtitle else ""), fontsize=9, color=MUTED)
    draw = {"timeseries": draw_timeseries, "graph": draw_timeseries, "stat": draw_stat, "gauge": draw_stat,
            "bargauge": draw_bargauge}
    for p in panels:
        g = p["gridPos"]
        px, py = margin + g["x"] * col, header + g["y"] * row_px
        pw, ph = g["w"] * col - gap, g["h"] * row_px - gap
        if p["type"] == "row":
            cv.text(px, py + 8, p.get("title", ""), fontsize=12, fontweight="bold")
            continue
        cv.box(px, py, pw, ph, PANEL, BORDER)
        cv.text(px + 10, py + 9, p.get("title", ""), fontsize=10.5)
        fn = draw.get(p["type"])
        if fn is None:
            draw_no_data(cv, px, py + 12, pw, ph - 12)
            continue
        try:
            data = fetch_panel(prometheus, p, variables, start, end, step)
        except (RuntimeError, OSError) as e:
            print(f"render: panel {p.get('title')!r}: {e}", file=sys.stderr)
            data = []
        fn(cv, p, data, px, py, pw, ph, start, end)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=dpi, facecolor=BG)
    plt.close(fig)
    if colors:
        try:
            from PIL import Image

            with Image.open(out) as im:
                q = im.convert("RGB").quantize(colors=colors, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
            q.save(out, optimize=True)
        except ImportError:
            pass
    return width, height


# ---------------------------------------------------------------- demo


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sha256(secret):
    return hashlib.sha256(secret.encode()).hexdigest()


def log(msg):
    print(f"dashboard-demo [{time.strftime('%H:%M:%S')}]: {msg}", file=sys.stderr, flush=True)


def wait_http(url, proc, timeout, headers=None, what="service"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            req = urllib.request.Request(url, headers=headers or {})
            with urllib.request.urlopen(req, timeout=1) as r:
                if r.status == 200:
                    return
        except (OSError, http.client.HTTPException):
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not answer {url} within {timeout} s")


class Procs:
    """The processes the demo started; kill_all() ends exactly those (by pid)."""

    def __init__(self, tmp):
        self.tmp, self.procs = tmp, {}

    def start(self, name, cmd, env=None):
        logf = open(os.path.join(self.tmp, f"{name}.log"), "a")
        p = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             env={**os.environ, **(env or {})}, cwd=self.tmp)
        logf.close()
        self.procs[name] = p
        return p

    def kill(self, name):
        p = self.procs.get(name)
        if p and p.poll() is None:
            p.kill()
            p.wait(timeout=10)

    def kill_all(self):
        for name in list(self.procs):
            try:
                self.kill(name)
            except Exception as e:  # keep going: every process must end
                log(f"could not stop {name}: {e}")


UPSTREAM_KEY = "sk-dashboard-demo-upstream"
SYSTEM_PROMPTS = [
    "You are a concise assistant for a small engineering team. Answer in plain English.",
    "You review pull requests. Point out bugs first, then style. Be brief and specific.",
    "You translate user questions into SQL for a PostgreSQL database of orders and customers.",
]
QUESTIONS = [
    "Summarise the difference between TCP and UDP.",
    "Why does my Rust build take so long on a two-core machine?",
    "Write a haiku about reverse SSH tunnels.",
    "What is a good default for a connection pool idle timeout?",
    "Explain server-sent events to a new colleague.",
    "List three ways to reduce time to first token.",
    "How do I rotate an API key without downtime?",
    "Which customers ordered more than five times last month?",
]


class Traffic:
    """Threads that send realistic requests to the gateway until `stop` is set."""

    def __init__(self, port, keys, models, t0, duration):
        self.port, self.keys, self.models = port, keys, models
        self.t0, self.duration = t0, duration
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.outcomes = collections.Counter()
        self.upstream_down = threading.Event()

    def elapsed(self):
        return time.monotonic() - self.t0

    def note(self, what):
        with self.lock:
            self.outcomes[what] += 1

    def sleep(self, seconds):
        self.stop.wait(max(0.0, seconds))

    # one request -----------------------------------------------------------
    def body(self, route, model, stream, max_tokens):
        system = random.choice(SYSTEM_PROMPTS)
        question = random.choice(QUESTIONS) + " " + " ".join(random.choices(QUESTIONS, k=random.randint(0, 6)))
        if route == "chat":
            b = {"model": model, "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}],
                 "max_tokens": max_tokens, "ignore_eos": True}
            if stream:
                b["stream_options"] = {"include_usage": True}
            return "/v1/chat/completions", {**b, "stream": stream}
        if route == "completions":
            return "/v1/completions", {"model": model, "prompt": f"{system}\n\nQ: {question}\nA:", "max_tokens": max_tokens,
                                       "ignore_eos": True, "stream": stream}
        if route == "messages":
            return "/v1/messages", {"model": model, "system": system, "max_tokens": max_tokens, "ignore_eos": True,
                                    "messages": [{"role": "user", "content": question}], "stream": stream}
        return "/v1/responses", {"model": model, "instructions": system, "input": question,
                                 "max_output_tokens": max_tokens, "ignore_eos": True, "stream": stream}

    def send(self, path, body, key, method="POST", read_bytes=None, hold=0.0, timeout=30):
        """Returns the status; read_bytes: read that much of the body, then hang up."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            headers = {"Content-Type": "application/json"} if body is not None else {}
            if key:
                headers["Authorization"] = f"Bearer {key}"
            conn.request(method, path, json.dumps(body) if body is not None else None, headers)
            if hold:  # a client that gives up while its request waits
                conn.sock.settimeout(hold)
                try:
                    resp = conn.getresponse()
                except (TimeoutError, socket.timeout):
                    return "gave up"
            else:
                resp = conn.getresponse()
            if read_bytes:
                resp.read1(read_bytes) if hasattr(resp, "read1") else resp.read(read_bytes)
                return f"{resp.status} cut"
            resp.read()
            return str(resp.status)
        except (OSError, http.client.HTTPException) as e:
            return type(e).__name__
        finally:
            conn.close()

    def rate(self):
        """Requests per second wanted now: a slow wave with a busier middle."""
        t = self.elapsed()
        wave = 4.0 + 2.5 * math.sin(2 * math.pi * t / 95.0)
        busy = 4.0 if 0.30 * self.duration < t < 0.42 * self.duration else 0.0
        return max(1.0, wave + busy)

    # the threads -------------------------------------------------------------
    def worker(self, n_workers):
        while not self.stop.is_set():
            key = random.choices(["alice", "bob"], weights=[0.6, 0.4])[0]
            model = random.choices(self.models, weights=[0.7, 0.3])[0]
            route = random.choices(["chat", "completions", "messages", "responses"], weights=[0.6, 0.15, 0.15, 0.1])[0]
            stream = random.random() < 0.6
            max_tokens = int(random.choice([16, 24, 48, 64, 96, 128, 200, 320]) * random.uniform(0.8, 1.2))
            path, body = self.body(route, model, stream, max_tokens)
            self.note(self.send(path, body, self.keys[key]))
            self.sleep(random.expovariate(self.rate() / n_workers))

    def misc(self):
        """Wrong keys (401), a model a key may not use (403), /v1/models."""
        while not self.stop.is_set():
            r = random.random()
            path, body = self.body("chat", self.models[0], False, 16)
            if r < 0.55:
                self.note("bad key " + self.send(path, body, "sk-not-a-key-" + str(random.randint(0, 999))))
            elif r < 0.75:
                self.note("no key " + self.send(path, body, None))
            elif r < 0.85:
                path, body = self.body("chat", self.models[1], False, 16)
                self.note("model not allowed " + self.send(path, body, self.keys["carol"]))
            else:
                self.note("models " + self.send("/v1/models", None, self.keys["alice"], method="GET"))
            self.sleep(random.uniform(1.0, 4.0))

    def bursts(self):
        """carol (requests_per_minute: 20) sends bursts: the first 20 pass, then 429s."""
        for at in (0.15, 0.72):
            self.sleep(self.t0 + at * self.duration - time.monotonic())
            if self.stop.is_set():
                return
            for _ in range(32):
                if self.stop.is_set():
                    return
                path, body = self.body("chat", self.models[0], False, 16)
                self.note("carol " + self.send(path, body, self.keys["carol"]))
                self.sleep(0.15)

    def disconnects(self):
        """Clients that leave: mid-stream, and while queued for a busy slot."""
        self.sleep(8)
        i = 0
        while not self.stop.is_set():
            i += 1
            if self.upstream_down.is_set():
                self.sleep(2)
                continue
            if i % 4 == 0:
                # two long generations take both slots (max_in_flight 2); a third
                # request waits in the gateway's queue and its client gives up
                longs = [threading.Thread(target=lambda: self.note("long " + self.send(
                    *self.body("chat", self.models[0], True, 1800), self.keys["alice"])), daemon=True) for _ in range(2)]
                for t in longs:
                    t.start()
                self.sleep(0.15)
                path, body = self.body("chat", self.models[0], True, 64)
                self.note("queued, client left: " + self.send(path, body, self.keys["bob"], hold=0.6))
                for t in longs:
                    t.join(timeout=30)
            else:
                path, body = self.body("chat", random.choice(self.models), True, 1500)
                self.note("stream cut: " + self.send(path, body, self.keys["alice"], read_bytes=300))
            self.sleep(random.uniform(5, 10))

    def run(self, llama_restart, outage_at=0.55, outage_for=20.0):
        threads = [threading.Thread(target=self.worker, args=(3,), daemon=True) for _ in range(3)]
        threads += [threading.Thread(target=f, daemon=True) for f in (self.misc, self.bursts, self.disconnects)]
        for t in threads:
            t.start()
        try:
            self.sleep(self.t0 + outage_at * self.duration - time.monotonic())
            if not self.stop.is_set():
                log(f"stopping llama-server (SIGKILL) for {outage_for:.0f} s")
                self.upstream_down.set()
                llama_restart(down=True)
                self.sleep(outage_for)
                llama_restart(down=False)
                self.upstream_down.clear()
                log("llama-server is back")
            while not self.stop.is_set() and self.elapsed() < self.duration:
                self.sleep(min(5.0, self.duration - self.elapsed()))
        finally:
            self.stop.set()
            for t in threads:
                t.join(timeout=40)


def demo(args):
    import matplotlib  # noqa: F401  (fail now, not after the traffic)

    for what, path in (("llama-server", args.llama_server), ("model", args.model), ("llm-edge", args.llm_edge)):
        if not path or not os.path.exists(path):
            sys.exit(f"dashboard-demo: {what} not found: {path!r}")
    prometheus_bin = shutil.which("prometheus")
    if not prometheus_bin:
        sys.exit("dashboard-demo: prometheus is not installed (Debian: apt-get install prometheus)")
    began = time.monotonic()
    tmp = tempfile.mkdtemp(prefix="llm-edge-dashboard-")
    procs = Procs(tmp)

    def on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    try:
        llama_port, edge_port, metrics_port, prom_port = (free_port() for _ in range(4))
        llama_cmd = [args.llama_server, "-m", args.model, "-a", "tiny-upstream", "--host", "127.0.0.1",
                     "--port", str(llama_port), "-t", "1", "-np", "2", "-c", "8192",
                     "--api-key", UPSTREAM_KEY, "--metrics"]

        def start_llama():
            p = procs.start("llama-server", llama_cmd)
            wait_http(f"http://127.0.0.1:{llama_port}/health", p, 60, what="llama-server")

        log(f"temporary directory {tmp}")
        log(f"starting llama-server on 127.0.0.1:{llama_port}")
        start_llama()

        keys = {k: f"sk-dashboard-demo-{k}-{os.urandom(6).hex()}" for k in ("alice", "bob", "carol")}
        config = os.path.join(tmp, "llm-edge.yaml")
        with open(config, "w") as f:
            f.write(f"""upstream:
  url: http://127.0.0.1:{llama_port}
  api_key: {UPSTREAM_KEY}
  max_in_flight: 2
  queue_timeout: 20s
default_model: tiny
models:
  - name: tiny
    aliases: [tiny-chat]
    upstream_name: tiny-upstream
  - name: tiny-code
    upstream_name: tiny-upstream
keys:
  - id: alice
    sha256: {sha256(keys['alice'])}
  - id: bob
    sha256: {sha256(keys['bob'])}
    limits:
      tokens_per_day: {args.bob_tokens_per_day}
      tokens_per_month: {args.bob_tokens_per_day * 12}
  - id: carol
    sha256: {sha256(keys['carol'])}
    models: [tiny]
    limits:
      requests_per_minute: 20
state_dir: {tmp}/state
ledger:
  flush_interval: 1s
metrics:
  listen: 127.0.0.1:{metrics_port}
server:
  threads: 2
  pid_file: {tmp}/llm-edge.pid
  upgrade_sock: {tmp}/upgrade.sock
  grace_period_seconds: 1
  graceful_shutdown_timeout_seconds: 1
""")
        os.makedirs(os.path.join(tmp, "state"), exist_ok=True)
        log(f"starting llm-edge on 127.0.0.1:{edge_port} (metrics on 127.0.0.1:{metrics_port})")
        edge = procs.start("llm-edge", [args.llm_edge, "--config", config, "--listen", f"127.0.0.1:{edge_port}"],
                           env={"RUST_LOG": "warn"})
        wait_http(f"http://127.0.0.1:{metrics_port}/metrics", edge, 30, what="llm-edge")

        with open(os.path.join(tmp, "prometheus.yml"), "w") as f:
            f.write(f"""global:
  scrape_interval: 2s
  evaluation_interval: 2s
scrape_configs:
  - job_name: llm-edge
    static_configs:
      - targets: ["127.0.0.1:{metrics_port}"]
""")
        log(f"starting Prometheus on 127.0.0.1:{prom_port} (scrape interval 2 s)")
        prom = procs.start("prometheus", [prometheus_bin, f"--config.file={tmp}/prometheus.yml",
                                          f"--storage.tsdb.path={tmp}/tsdb", f"--web.listen-address=127.0.0.1:{prom_port}"])
        prom_url = f"http://127.0.0.1:{prom_port}"
        wait_http(prom_url + "/-/ready", prom, 30, what="Prometheus")
        start = time.time()
        time.sleep(6)  # a few idle scrapes first

        def llama_restart(down):
            if down:
                procs.kill("llama-server")
            else:
                start_llama()

        log(f"driving traffic for {args.duration:.0f} s")
        traffic = Traffic(edge_port, keys, ["tiny", "tiny-code"], time.monotonic(), args.duration)
        traffic.run(llama_restart)
        log("traffic done: " + ", ".join(f"{k} x{v}" for k, v in sorted(traffic.outcomes.items())))
        time.sleep(6)  # the idle end: in-flight gauges back at 0
        end = time.time()
        step = max(2, int((end - start) / 150))
        variables = {"job": "llm-edge", "model": ".*", "datasource": "prometheus",
                     "__rate_interval": args.rate_interval, "__interval": f"{step}s",
                     "__range": f"{int(end - start)}s", **dict(kv.partition("=")[::2] for kv in args.var)}
        log(f"rendering {args.out} ({end - start:.0f} s of data, step {step} s, rate interval {args.rate_interval})")
        w, h = render(args.dashboard, prom_url, args.out, int(start), int(end), step, variables, width=args.width,
                      subtitle=f"$__rate_interval = {args.rate_interval}   ·   demo traffic from scripts/dashboard-demo.sh")
        log(f"wrote {args.out}: {w}x{h} px, {os.path.getsize(args.out) // 1024} KiB, "
            f"whole run {time.monotonic() - began:.0f} s")
    finally:
        procs.kill_all()
        if args.keep_tmp:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", nargs="?", choices=["render", "demo"], default="render")
    ap.add_argument("--dashboard", default=os.path.join(REPO, "conf", "grafana", "llm-edge.json"))
    ap.add_argument("--out", default=os.path.join(REPO, "docs", "dashboard.png"))
    ap.add_argument("--width", type=int, default=1800, help="image width in pixels")
    ap.add_argument("--rate-interval", default="20s", help="value of $__rate_interval")
    ap.add_argument("--var", action="append", default=[], metavar="NAME=VALUE",
                    help="a dashboard variable (default job=llm-edge, model=.*)")
    g = ap.add_argument_group("render mode")
    g.add_argument("--prometheus", default="http://127.0.0.1:9090")
    g.add_argument("--minutes", type=float, default=15, help="time range ending now")
    g.add_argument("--start", type=int, help="range start, Unix seconds (instead of --minutes)")
    g.add_argument("--end", type=int, help="range end, Unix seconds (default: now)")
    g.add_argument("--step", type=int, default=0, help="query_range step in seconds (default: range / 150)")
    g = ap.add_argument_group("demo mode")
    g.add_argument("--llm-edge", default=os.environ.get("LLM_EDGE_BIN"))
    g.add_argument("--llama-server", default=os.environ.get("LLAMA_SERVER_BIN"))
    g.add_argument("--model", default=os.environ.get("TINY_MODEL"))
    g.add_argument("--duration", type=float, default=210, help="seconds of traffic")
    g.add_argument("--bob-tokens-per-day", type=int, default=70000)
    g.add_argument("--keep-tmp", action="store_true")
    args = ap.parse_args()
    if args.mode == "demo":
        demo(args)
        return
    end = args.end or int(time.time())
    start = args.start or int(end - args.minutes * 60)
    step = args.step or max(1, (end - start) // 150)
    variables = {"job": "llm-edge", "model": ".*", "datasource": "prometheus", "__rate_interval": args.rate_interval,
                 "__interval": f"{step}s", "__range": f"{end - start}s"}
    variables.update(dict(kv.partition("=")[::2] for kv in args.var))
    w, h = render(args.dashboard, args.prometheus, args.out, start, end, step, variables, width=args.width,
                  subtitle=f"$__rate_interval = {args.rate_interval}")
    print(f"{args.out}: {w}x{h} px, {os.path.getsize(args.out) // 1024} KiB")


if __name__ == "__main__":
    main()
