#!/bin/bash
# usage: cpu.sh CMD... ; prints wall seconds and average busy cores (whole machine, /proc/stat)
read -r _ u n s i w irq sirq st _ < /proc/stat; b0=$((u+n+s+irq+sirq+st)); t0=$(date +%s.%N)
"$@" > /dev/null 2>&1
read -r _ u n s i w irq sirq st _ < /proc/stat; b1=$((u+n+s+irq+sirq+st)); t1=$(date +%s.%N)
python3 -c "w=$t1-$t0; print(f'wall {w:.1f}s, busy cores {($b1-$b0)/100/w:.2f}')"
