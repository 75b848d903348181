# What `kd-runner selfcheck`'s table ($OUT/selfcheck.txt) says about kd's kernels, for
# device-check.sh (sourced). The CPU tests run these functions on tables of their own
# (crates/kd-runner/tests/device_script.rs), so the first GPU session does not test them.

fallbacks() { # after selfcheck: the kernel families it found out of bounds, as KD_DISABLE parts,
  # so that the benches and the 15-epoch run that follow use candle's ops for a broken kernel
  # (slower, correct) rather than train on wrong numbers. Exported; printed into steps.txt.
  local f="$OUT/selfcheck.txt" d="" finished=1
  [ -f "$f" ] || return 0
  # selfcheck ends with "N checks, M failed"; without it the process died (a crash, the step's
  # time limit), and a family it did not reach counts as failed: it was never checked.
  grep -qE "^[0-9]+ checks, [0-9]+ failed\$" "$f" || finished=0
  # A family is bad when one of its rows failed, or, after a crash, when it has no row at all.
  # An error inside a family is a failing row too (`NAME: error: …`). Channels-last rows are
  # left out: that path is opt-in (train.memory_format), and a failing one only keeps its bench
  # from running (channels_last_ok).
  bad() {
    grep -E "^\| $1.*\| FAIL \|\$" "$f" | grep -qv "channels-last" && return 0
    [ "$finished" = 0 ] && ! grep -qE "^\| $1" "$f"
  }
  bad "conv" && d="$d,conv"
  # A wrong residual tail (training mode) alone costs only its own op. Of the other BatchNorm
  # rows (training or eval mode), a wrong running-statistics update alone costs only its fused
  # launch; anything else (an error included) turns off both BatchNorm paths.
  bad "batch norm train tail" && d="$d,traintail"
  if bad "batch norm(:| (eval |F|B)[^|]*:) (y|mean|var|dx|dγ|dβ|error:) "; then d="$d,bn,bneval"
  elif bad "batch norm (F|B)[^|]*: running"; then d="$d,bnrunning"; fi
  bad "max-pool" && d="$d,pool"
  bad "add \\+" && d="$d,addrelu"
  bad "softmax loss" && d="$d,losses"
  bad "fused SGD" && d="$d,sgd"
  { bad "augment" || bad "resident loader"; } && d="$d,augment"
  d="${d#,}"
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
