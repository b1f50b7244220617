#!/usr/bin/env bash
# Instructions per conversion (gmem's own work in user space) counted by
# callgrind, for hosts without a hardware instruction counter (a nested VM:
# `gmem bench --instructions` then says so). Runs the same work as those
# rows: `gmem bench --only instructions-PATTERN` under
# `valgrind --tool=callgrind`, collecting only inside
# `gmem_cli::bench::instructions::counted` (the counted pass; the file's
# setup, the uncounted first pass and the preparation are not collected),
# and divides by the units of work the command reports on stderr.
#
#   scripts/instructions.sh [PATTERN...]    # in-order scattered batch
#
# Environment: GMEM (the binary; default target/release/gmem, built if
# missing), KEEP=DIR keeps callgrind's output files there (for
# `callgrind_annotate DIR/PATTERN.out`). Prints one line a pattern and
# exits 1 when a count is over its goal, 2 on any other failure.
set -euo pipefail

cd "$(dirname "$0")/.."
gmem=${GMEM:-target/release/gmem}
if [[ -z ${GMEM:-} ]]; then
    cargo build --release -q -p gmem-cli
fi
command -v valgrind >/dev/null || { echo "valgrind is not installed" >&2; exit 2; }
patterns=("$@")
[[ ${#patterns[@]} -gt 0 ]] || patterns=(in-order scattered batch)
dir=${KEEP:-$(mktemp -d)}
mkdir -p "$dir"
[[ -n ${KEEP:-} ]] || trap 'rm -rf "$dir"' EXIT

missed=0
printf '%-12s %14s %10s %-12s %s\n' pattern instructions units per goal
for pattern in "${patterns[@]}"; do
    out=$dir/$pattern.out
    log=$dir/$pattern.log
    if ! valgrind --tool=callgrind --callgrind-out-file="$out" \
        --toggle-collect='*bench::instructions::counted*' \
        "$gmem" bench --only "instructions-$pattern" >/dev/null 2>"$log"; then
        echo "$pattern: gmem failed under callgrind; see $log" >&2
        KEEP=1
        exit 2
    fi
    # "counted: PATTERN UNITS UNIT GOAL", printed by the row.
    read -r _ _ units unit goal < <(grep "^counted: $pattern " "$log")
    total=$(awk '/^(summary|totals):/ { print $2; exit }' "$out")
    if [[ -z $units || -z $total ]]; then
        echo "$pattern: no count in $log or $out" >&2
        exit 2
    fi
    per=$(awk -v t="$total" -v u="$units" 'BEGIN { printf "%.1f", t / u }')
    verdict=$(awk -v p="$per" -v g="$goal" 'BEGIN { print (p <= g) ? "met" : "MISSED" }')
    [[ $verdict == met ]] || missed=1
    printf '%-12s %14s %10s %-12s <= %s a %s: %s\n' \
        "$pattern" "$total" "$units" "$per/$unit" "$goal" "$unit" "$verdict"
done
exit $missed
