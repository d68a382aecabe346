#!/usr/bin/env bash
# The first device call: Birder's GPU path on ONE GPU in at most 7 minutes of parts; results in OUT_DIR.
#   bash benchmarks/gpu_check.sh OUT_DIR                          # every part (docs/gpu.md: the one-call command)
#   PARTS="hook collectives" bash benchmarks/gpu_check.sh OUT_DIR  # a rerun of some parts
#   GPU_CHECK_REHEARSAL=1 bash benchmarks/gpu_check.sh OUT_DIR     # this script's flow on CPU, small sizes: no GPU figure
# Parts, each under its own timeout (seconds, 420 in all), in the order they run:
#   env 20 | kernels 50 | hook 70 | collectives 70 | bench 70 | tests 75 | hsdp 35 | app 30
# OUT_DIR receives at most 6 files (the device tool brings back 8): summary.txt (one line per part, written
# as each part ends), gpu_check.json (every figure, rewritten after each part), log.txt (all output),
# tests_kernels.txt, bench_kernels.md, trace_birder.json.gz (the hook's profile, when under 16 MiB).
set -uo pipefail
out=${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
parts=${PARTS:-env kernels hook collectives bench tests hsdp app}
log="$out/log.txt"
summary="$out/summary.txt"
: > "$summary"

device_args=() bench_sizes=64M
if [ "${GPU_CHECK_REHEARSAL:-0}" = 1 ]; then
  echo "gpu_check: REHEARSAL on CPU at small sizes: no figure here is a GPU's" | tee -a "$summary"
  device_args=(--device cpu --small) bench_sizes=100K
elif ! $py -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" >> "$log" 2>&1; then
  echo "gpu_check: no CUDA device (torch.cuda.is_available() is False in $py): nothing checked" | tee -a "$summary"
  exit 2
fi

# The wheels the call carries (benchmarks/gpu_wheels.sh: hydra-core, omegaconf, antlr4 runtime), and this
# checkout as dist_supernet (its kernels/ folder installs as dist_supernet.kernels: an install is needed).
if compgen -G ".whl/*.whl" > /dev/null; then
  $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu_check_site \
    .whl/*.whl >> "$log" 2>&1 && export PYTHONPATH="/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}"
fi
this_checkout() {  # whether dist_supernet.kernels imports from this checkout's kernels/
  $py -c "import os, sys, dist_supernet.kernels as k; sys.exit(os.path.realpath(k.__file__) != os.path.realpath('kernels/__init__.py'))" \
    >> "$log" 2>&1
}
if ! this_checkout; then
  # an editable install needs setuptools and wheel there (no network: no build isolation); else, in this
  # disposable copy, links put kernels/ and conf/ where dist_supernet looks for them
  $py -m pip install -q --no-index --no-deps --no-build-isolation -e . >> "$log" 2>&1 \
    || { ln -sfn ../kernels dist_supernet/kernels && ln -sfn ../conf dist_supernet/conf \
         && export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"; }
fi
if ! this_checkout; then
  echo "gpu_check: dist_supernet.kernels does not import from this checkout (see log.txt)" | tee -a "$summary"
  exit 3
fi

export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-lo} PYTHONUNBUFFERED=1 CUBLAS_WORKSPACE_CONFIG=:4096:8
export DIST_SUPERNET_NUMBA_WARMUP=0  # the numba kernels are not under test here (their cache is per CPU)
unset TRITON_INTERPRET DIST_SUPERNET_KERNELS
status=0

# run_part NAME TIMEOUT_S COMMAND...: its output to log.txt, one line to summary.txt; a timeout is recorded in
# gpu_check.json too, so the parts before and after it still count.
run_part() {
  local name=$1 limit=$2; shift 2
  case " $parts " in *" $name "*) ;; *) return 0 ;; esac
  local start=$SECONDS rc
  echo "=== $name (limit ${limit}s) ===" >> "$log"
  timeout -k 5 "$limit" "$@" >> "$log" 2>&1
  rc=$?
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    $py benchmarks/gpu_check.py "$out" --record-failure "$name" "timed out after ${limit}s" >> "$log" 2>&1
  fi
  [ $rc -eq 0 ] || status=1
  echo "$name: rc=$rc $((SECONDS - start))s $(part_line "$name")" | tee -a "$summary"
}

# part_line NAME: the figures of one part that say pass or fail, from gpu_check.json (or its own files).
part_line() {
  $py - "$out" "$1" <<'EOF' 2>/dev/null
import json, sys, pathlib
out, name = pathlib.Path(sys.argv[1]), sys.argv[2]
report = json.loads((out / "gpu_check.json").read_text()) if (out / "gpu_check.json").is_file() else {}
part = report.get(name, {})
if isinstance(part, dict) and "error" in part:
    print("ERROR", part["error"][:300])
elif name == "env":
    print({k: part.get(k) for k in ("gpu", "torch", "triton", "cuda", "hydra")})
elif name == "kernels":
    print(f"all_equal={part.get('all_equal')} checks={part.get('checks')} failed={part.get('failed')}")
elif name == "hook":
    keys = part.get("keys") or {}
    print(f"torch_path_equal={part.get('params_equal_torch_path')} bf16={part.get('bf16_params_equal_torch_path')} "
          f"syncs_hook={part.get('host_syncs_in_hook')} syncs_step={part.get('host_syncs_in_step')} "
          f"own_stream={(part.get('streams') or {}).get('hook_on_own_stream')} "
          f"birder_vs_fp32={part.get('birder_vs_fp32')} warmup_s={part.get('warmup_s')} "
          f"untuned_from_step3={keys.get('untuned_from_step3')}")
elif name == "collectives":
    bad = [f"{w}/{k}" for w, v in part.items() if w.startswith("world_") for k, r in v.items()
           if not (isinstance(r, dict) and r.get("equal_to_cpu_reference", r.get("replicas_equal")) is True
                   and r.get("x_equal_across_ranks", True) is True)]
    print(f"all_equal={part.get('all_equal')} not_equal={bad}")
elif name == "app":
    print({k: part.get(k) for k in ("returncode", "steps", "final_loss", "params_in_sync")})
elif name in ("tests", "hsdp"):  # pytest's closing line, from this part's section of the log
    log = (out / "log.txt").read_text().split(f"=== {name} ")[-1].splitlines()
    print(next((l for l in reversed(log) if any(w in l for w in (" passed", " failed", " error", " skipped"))),
               "no pytest summary"))
elif name == "bench":
    rows = [l for l in (out / "bench_kernels.md").read_text().splitlines() if "triton" in l] \
        if (out / "bench_kernels.md").is_file() else []
    print(f"{len(rows)} triton rows in bench_kernels.md")
EOF
}

check=("$py" benchmarks/gpu_check.py "$out" "${device_args[@]}" --part)
run_part env 20 "${check[@]}" env
run_part kernels 50 env DIST_SUPERNET_AUTOTUNE=0 "${check[@]}" kernels  # default configs: one compile per key
run_part hook 70 "${check[@]}" hook
if [ -f "$out/trace_birder.json" ]; then
  gzip -f "$out/trace_birder.json"
  [ "$(stat -c %s "$out/trace_birder.json.gz")" -lt 16000000 ] || rm -f "$out/trace_birder.json.gz"
fi
rm -f "$out"/trace_*.json
run_part collectives 70 env DIST_SUPERNET_AUTOTUNE=0 "${check[@]}" collectives
run_part bench 70 "$py" benchmarks/bench_kernels.py --sizes "$bench_sizes" --rows 8 --out "$out/bench_kernels.md"
run_part tests 75 env DIST_SUPERNET_AUTOTUNE=0 "$py" -m pytest -q -p no:cacheprovider -o addopts= \
  --maxfail=30 tests/kernels -k "triton or (gpu_paths and not numba)"
[ -f "$log" ] && awk '/^=== tests /{p=1} p' "$log" | tail -400 > "$out/tests_kernels.txt"
# 1-bit HSDP on FSDP2: 2 processes on the GPU over gloo (2 nodes x 1), the hook on its own stream, every step
# equal bit for bit to the CPU torch reference (fp32 with clipping, bf16 reduce_dtype, track_unused).
run_part hsdp 35 env DIST_SUPERNET_AUTOTUNE=0 "$py" -m pytest -q -p no:cacheprovider -o addopts= \
  tests/distributed/test_hsdp_birder.py -k cuda
run_part app 30 "${check[@]}" app
echo "gpu_check: done, status=$status (summary.txt, gpu_check.json)" | tee -a "$summary"
exit $status
