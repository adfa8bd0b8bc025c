#!/usr/bin/env bash
# Mutation testing of the gates: parity (verify.py), attention fusion, the fp16 range guard,
# int8/fp8 scales (quantize.py + calibrate.py) and the Triton dims checks.
#
#   benchmarks/mutation.sh                       # every gate (see GATES below)
#   benchmarks/mutation.sh 'clipexport.verify.*' # only the mutants whose names match
#
# mutmut (the `dev` extra) makes one small change at a time in a gate function and runs the
# fast gate-level tests that reach it (tests/test_gates.py, tests/test_verify.py; set in
# pyproject.toml [tool.mutmut]); a mutant no test fails on "survived". Run it before resolving
# an issue that touches a gate, and update benchmarks/results/mutation.md: every survivor is
# either killed by a new test or listed there as equivalent, with its reason.
#
# It works on a copy of the tree (tracked and untracked files, uncommitted edits included) in a
# temporary directory, removed at the end (KEEP=1 keeps it, e.g. for `mutmut show NAME` there):
# the checkout itself is never written to. JOBS=N runs N mutants at once (default 1: the
# machines are shared). Everything: about 40 minutes with JOBS=1, 8 with JOBS=2 (2 shared cores).
set -euo pipefail

repo=$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)
bin=${VENV:-$repo/.venv}/bin
[[ -x "$bin/mutmut" ]] || bin=$(dirname "$(command -v mutmut)")

# The gate functions. Other functions of these files are guarded by the twin-level tests
# (too slow to run per mutant) and are not mutated here; artifacts.py (the manifest checks)
# is left out while it is being rewritten.
GATES=(
    'clipexport.verify.xǁTowerParityǁ*'
    'clipexport.verify.x_compare__mutmut_*'
    'clipexport.verify.x_top1_agreement__mutmut_*'
    'clipexport.verify.x_check_tower__mutmut_*'
    'clipexport.passes.fuse_attention.*'
    'clipexport.passes.precision.x_convert_precision__mutmut_*'
    'clipexport.passes.precision.x_apply_precision__mutmut_*'
    'clipexport.passes.quantize.*'
    'clipexport.passes.calibrate.x_collect_stats__mutmut_*'
    'clipexport.triton.config.*'
    'clipexport.triton.repository.x__check_dims__mutmut_*'
)
if (($#)); then GATES=("$@"); fi

work=$(mktemp -d /tmp/clipexport-mutation.XXXXXX)
if [[ -z "${KEEP:-}" ]]; then trap 'rm -rf "$work"' EXIT; else echo "working copy: $work"; fi
git -C "$repo" ls-files -z --cached --others --exclude-standard \
    | tar -C "$repo" --null --ignore-failed-read -T - -cf - | tar -C "$work" -xf -

cd "$work"
unset PYTHONPATH  # mutmut puts its mutants/ copy first on sys.path; nothing may shadow it
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_NUM_THREADS=1
nice -n 5 "$bin/mutmut" run --max-children "${JOBS:-1}" "${GATES[@]}" >"$work/run.log" 2>&1 \
    || { tail -40 "$work/run.log"; exit 1; }
tail -3 "$work/run.log" | tr '\r' '\n' | tail -2

# Per module: killed / survived / other (no tests, timeout, ...), then each survivor's diff.
"$bin/mutmut" results --all true >"$work/results.txt"
"$bin/python" - "$work/results.txt" "${GATES[@]}" <<'EOF'
import collections, fnmatch, sys

path, gates = sys.argv[1], sys.argv[2:]
counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
for line in open(path, encoding="utf-8"):
    name, _, status = line.strip().rpartition(": ")
    if not name or not any(fnmatch.fnmatch(name, g) for g in gates):
        continue
    module = name.split(".x", 1)[0]
    counts[module][status] += 1
print("| module | mutants | killed | survived | other |")
print("| --- | ---: | ---: | ---: | ---: |")
total = collections.Counter()
for module, c in sorted(counts.items()):
    n = sum(c.values())
    other = n - c["killed"] - c["survived"]
    total.update(c)
    print(f"| {module} | {n} | {c['killed']} | {c['survived']} | {other} |")
n = sum(total.values())
print(f"| all | {n} | {total['killed']} | {total['survived']} | {n - total['killed'] - total['survived']} |")
EOF
echo
while IFS= read -r line; do
    name=${line%:*}; name=${name// /}; status=${line##*: }
    [[ "$status" == killed ]] && continue
    match=0
    for g in "${GATES[@]}"; do [[ "$name" == $g ]] && match=1; done
    ((match)) || continue
    "$bin/mutmut" show "$name"
done <"$work/results.txt"
