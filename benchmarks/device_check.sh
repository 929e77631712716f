#!/usr/bin/env bash
# Every CUDA check of the project in one run (under 8 minutes on one H200), written as ONE JSON file.
#
#   bash benchmarks/device_check.sh [OUTPUT.json]
#
# Output: $1, else $OUT/device_check.json when $OUT is set, else ./device_check.json.
# Run it from the repository root. Python: .venv/bin/python if present, else python (else python3).
# If `import blackbox_rs` fails, it runs `pip install -e '.[dev]'` first (THIS MAY DOWNLOAD packages;
# offline, it falls back to `pip install -e . --no-deps --no-build-isolation`).
# Without a CUDA device it exits 0 at once and writes {"cuda": false, "note": "no CUDA device", ...}.
#
# Steps, each under its own `timeout` (and all under one overall deadline, DEVICE_CHECK_BUDGET_S,
# default 470 s), so one hang cannot eat the budget; a step that fails or times out is recorded and
# the next one runs:
#   a. pytest -m cuda -q                        (pass/fail counts and the tail of the output)
#   b. benchmarks/certify_overhead.py --case imagenet --device cuda: ResNet-50 at 3x224x224,
#      n = 10,000, cache on, vs bare forward and vs Cohen et al.'s reference; then (b_memory) peak
#      host and device memory of certify at n = 10,000 vs 100,000
#   c. benchmarks/_device_steps.py precision:   fp32 vs bf16 ResNet-50 through ModuleConnector(precision=)
#   d. benchmarks/_device_steps.py fit:         U-Net denoiser fit (denoise, 200 steps, batch 64) GPU vs CPU
# c and d print {"skipped": ...} when the SDK feature they need is missing in this checkout.
set -u

T0=$(date +%s)
BUDGET=${DEVICE_CHECK_BUDGET_S:-470}
if [ $# -ge 1 ] && [ -n "$1" ]; then
    DEST=$1
elif [ -n "${OUT:-}" ]; then
    DEST=$OUT/device_check.json
else
    DEST=./device_check.json
fi
mkdir -p "$(dirname "$DEST")"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/device_check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

if [ -x .venv/bin/python ]; then
    PY=.venv/bin/python
elif command -v python >/dev/null 2>&1; then
    PY=python
else
    PY=python3
fi

# ---- no CUDA (or no torch): say so and stop, quickly ------------------------------------------
CUDA=$("$PY" -c "import torch; print('yes' if torch.cuda.is_available() else 'no')" 2>"$WORK/torch.err" || echo notorch)
# DEVICE_CHECK_FORCE=1 runs the steps anyway (to test this script itself on a machine without CUDA)
if [ "$CUDA" != "yes" ] && [ "${DEVICE_CHECK_FORCE:-0}" != "1" ]; then
    if [ "$CUDA" = "notorch" ]; then why="torch is not importable by $PY"; else why="no CUDA device"; fi
    "$PY" - "$DEST" "$why" "$PY" <<'EOF' 2>/dev/null || printf '{"cuda": false, "note": "%s"}\n' "$why" >"$DEST"
import json, sys
dest, why, py = sys.argv[1:4]
json.dump({"cuda": False, "note": why, "python": py, "steps_run": []}, open(dest, "w"), indent=2)
EOF
    echo "device_check: $why; wrote $DEST"
    exit 0
fi

remaining() { echo $(( BUDGET - ($(date +%s) - T0) )); }

# run_step NAME TIMEOUT_S CMD...: stdout/stderr/rc/seconds of the step under $WORK
run_step() {
    local name=$1 limit=$2 left
    shift 2
    left=$(( $(remaining) - 5 ))
    if [ "$left" -lt 20 ]; then
        echo "skipped: overall deadline (${BUDGET}s) reached" >"$WORK/$name.skip"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "device_check: step $name (timeout ${limit}s)" >&2
    local t=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" >"$WORK/$name.out" 2>"$WORK/$name.err"
    echo $? >"$WORK/$name.rc"
    echo $(( $(date +%s) - t )) >"$WORK/$name.secs"
    echo "$limit" >"$WORK/$name.limit"
}

# ---- the package ---------------------------------------------------------------------------
INSTALL="already importable"
if ! "$PY" -c "import blackbox_rs" 2>/dev/null; then
    echo "device_check: blackbox_rs not importable: pip install -e '.[dev]' (may download)" >&2
    if timeout 150 "$PY" -m pip install -q -e '.[dev]' >"$WORK/install.log" 2>&1; then
        INSTALL="installed: pip install -e '.[dev]'"
    elif timeout 60 "$PY" -m pip install -q -e . --no-deps --no-build-isolation >>"$WORK/install.log" 2>&1; then
        INSTALL="installed offline: pip install -e . --no-deps --no-build-isolation"
    else
        INSTALL="install failed (see install_log_tail)"
    fi
fi

# ---- the checks ----------------------------------------------------------------------------
run_step a_pytest_cuda 100 "$PY" -m pytest -m cuda -q -p no:cacheprovider
run_step b_overhead 150 "$PY" benchmarks/certify_overhead.py --case imagenet --device cuda --n 10000 \
    --batch-size 500 --reps 2 --threads 8 --no-rss
run_step c_precision 60 "$PY" benchmarks/_device_steps.py precision --batch-size 500 --batches 8 --reps 3
run_step d_fit_unet 120 "$PY" benchmarks/_device_steps.py fit --steps 200 --batch-size 64 --shape 1 28 28 --threads 16
run_step b_memory 200 "$PY" benchmarks/certify_overhead.py --case imagenet --device cuda --batch-size 500 \
    --threads 8 --rss-n 10000 100000 --rss-only

# ---- one JSON file -------------------------------------------------------------------------
"$PY" - "$WORK" "$DEST" "$PY" "$INSTALL" "$T0" <<'EOF'
import json, re, sys, time
from pathlib import Path

work, dest, py, install, t0 = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])


def read(p: Path) -> str:
    return p.read_text(errors="replace") if p.exists() else ""


def last_json(text: str):
    """The JSON object a step printed: the whole stdout, else its last line that parses."""
    try:
        return json.loads(text)
    except ValueError:
        for line in reversed(text.strip().splitlines()):
            try:
                return json.loads(line)
            except ValueError:
                continue
    return None


out = {"cuda": None, "python": py, "package": install, "steps": {}}
try:
    import torch
    out["cuda"] = torch.cuda.is_available()
    out["device_name"] = torch.cuda.get_device_name(0)
    out["torch"] = torch.__version__
except Exception as exc:  # noqa: BLE001
    out["device_name"] = f"unknown ({exc})"
if (work / "install.log").exists():
    out["install_log_tail"] = read(work / "install.log")[-2000:]
ok = True
for name in ("a_pytest_cuda", "b_overhead", "b_memory", "c_precision", "d_fit_unet"):
    if (work / f"{name}.skip").exists():
        out["steps"][name] = {"status": read(work / f"{name}.skip").strip()}
        ok = False
        continue
    rc = int(read(work / f"{name}.rc").strip() or -1)
    step = {"rc": rc, "seconds": int(read(work / f"{name}.secs").strip() or 0),
            "timeout_s": int(read(work / f"{name}.limit").strip() or 0)}
    step["status"] = "timed out" if rc in (124, 137) else "ok" if rc == 0 else "failed"
    stdout, stderr = read(work / f"{name}.out"), read(work / f"{name}.err")
    if name == "a_pytest_cuda":
        text = stdout + stderr
        counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed|xpassed)",
                                                   text.strip().splitlines()[-1] if text.strip() else "")}
        step["counts"] = counts
        step["tail"] = text[-3000:]
        if rc == 5:
            step["status"] = "no tests collected"
        good = rc == 0 and counts.get("passed", 0) > 0
        if rc == 0 and not counts.get("passed", 0):
            step["status"] = "nothing passed (all skipped?)"
    else:
        result = last_json(stdout)
        step["result"] = result
        if result is None or rc != 0:
            step["stderr_tail"] = stderr[-3000:]
        good = rc == 0 and isinstance(result, dict) and result.get("ok", True) is not False
        if isinstance(result, dict) and "skipped" in result:
            step["status"] = "skipped: " + str(result["skipped"])
    ok = ok and good
    out["steps"][name] = step
out["all_ok"] = ok
out["seconds_total"] = int(time.time()) - t0
Path(dest).write_text(json.dumps(out, indent=2) + "\n")
print(f"device_check: wrote {dest} (all_ok={ok}, {out['seconds_total']} s)")
EOF
exit 0
