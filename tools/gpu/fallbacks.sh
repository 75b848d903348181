# What `kd-runner selfcheck`'s table ($OUT/selfcheck.txt) says about kd's kernels, for
# device-check.sh (sourced). The CPU tests run these functions on tables of their own
# (crates/kd-runner/tests/device_script.rs), so the first GPU session does not test them.

fallbacks() { # after selfcheck: the kernel families it found out of bounds, as KD_DISABLE parts,
  # so that the benches and the 15-epoch run that follow use candle's ops for a broken kernel
  # (slower, correct) rather than train on wrong numbers. Exported; printed into steps.txt.
  local f="$OUT/selfcheck.txt" d="" unchecked="" finished=1 timed_out=0
  [ -f "$f" ] || return 0
  # selfcheck ends with "N checks, M failed"; without it the process died (a crash, or the step's
  # time limit: `step` writes "selfcheck: rc 124" into steps.txt) before checking some families.
  grep -qE "^[0-9]+ checks, [0-9]+ failed\$" "$f" || finished=0
  grep -qE "^selfcheck: rc 124," "$OUT/steps.txt" 2>/dev/null && timed_out=1
  # bad PATTERN PARTS: whether a row matching PATTERN failed. An error inside a family is a
  # failing row too (`NAME: error: …`). Channels-last rows are left out: that path is opt-in
  # (train.memory_format), and a failing one only keeps its bench from running
  # (channels_last_ok). A family a cut-short selfcheck printed no row for was never checked:
  # after a crash it counts as failed; after the time limit it stays on (slow is not wrong,
  # and the benches need it), and steps.txt says so.
  bad() {
    grep -E "^\| $1.*\| FAIL \|\$" "$f" | grep -qv "channels-last" && return 0
    { [ "$finished" = 0 ] && ! grep -qE "^\| $1" "$f"; } || return 1
    [ "$timed_out" = 1 ] || return 0
    case ",$unchecked," in *",$2,"*) ;; *) unchecked="$unchecked,$2" ;; esac
    return 1
  }
  bad "conv" conv && d="$d,conv"
  # A wrong residual tail (training mode) alone costs only its own op. Of the other BatchNorm
  # rows (training or eval mode), a wrong running-statistics update alone costs only its fused
  # launch; anything else (an error included) turns off both BatchNorm paths.
  bad "batch norm train tail" traintail && d="$d,traintail"
  if bad "batch norm(:| (eval |F|B)[^|]*:) (y|mean|var|dx|dγ|dβ|error:) " bn,bneval; then
    d="$d,bn,bneval"
  elif bad "batch norm (F|B)[^|]*: running" bnrunning; then d="$d,bnrunning"; fi
  bad "max-pool" pool && d="$d,pool"
  bad "add \\+" addrelu && d="$d,addrelu"
  bad "softmax loss" losses && d="$d,losses"
  bad "fused SGD" sgd && d="$d,sgd"
  { bad "augment" augment || bad "resident loader" augment; } && d="$d,augment"
  d="${d#,}"
  if [ -n "$unchecked" ]; then
    echo "selfcheck: stopped by its time limit before checking ${unchecked#,}; left on" | tee -a "$OUT/steps.txt"
  fi
  if [ -n "$d" ]; then
    export KD_DISABLE="$d"
    echo "selfcheck: kernels out of bounds; what follows runs with KD_DISABLE=$d" | tee -a "$OUT/steps.txt"
  fi
}

channels_last_ok() { # selfcheck finished, has channels-last rows, and none of them failed
  local f="$OUT/selfcheck.txt"
  [ -f "$f" ] && grep -qE "^[0-9]+ checks, [0-9]+ failed\$" "$f" \
    && grep -qE "^\| .*channels-last.*\| ok \|\$" "$f" \
    && ! grep -qE "^\| .*channels-last.*\| FAIL \|\$" "$f"
}
