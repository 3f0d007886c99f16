#!/usr/bin/env bash
# Wall time and the average number of busy cores of the whole machine while a command runs
# (from /proc/stat, so sandboxed and detached processes count too). Usage:
#   benchmarks/busy_cores.sh COMMAND [ARGS...]
set -u
read -r _ u n s _ _ irq sirq st _ < /proc/stat
busy0=$((u + n + s + irq + sirq + st)); t0=$(date +%s.%N)
"$@" > /dev/null 2>&1
rc=$?
read -r _ u n s _ _ irq sirq st _ < /proc/stat
busy1=$((u + n + s + irq + sirq + st)); t1=$(date +%s.%N)
hz=$(getconf CLK_TCK)
python3 -c "w = $t1 - $t0; print(f'wall {w:.1f}s, busy cores {($busy1 - $busy0) / $hz / w:.2f}, exit $rc')"
exit $rc
