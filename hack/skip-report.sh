#!/usr/bin/env bash
# Prints every test skip recorded in a skip log ($KMR_SKIP_LOG, written by the tests through
# katamaran-test-skip: "<binary> <test>\t<tier>\t<why>" per line), then one summary line, and
# fails when a tier CI is meant to run was skipped.
#
#   hack/skip-report.sh LOG            the list, the summary line; exit 1 if a skip is not allowed
#   hack/skip-report.sh --summary LOG  only the summary line (same exit status)
#
# Tiers that may skip without failing:
#   kernel-module  the host kernel lacks sch_plug/ipip/ip_gre/ip6_tunnel/ip6_gre (CI's kernel
#                  does); the kernel lab VM exercises them, and its own skip fails the run
#   kubectl        kubectl is not on PATH (hack/deps.sh does not install it)
# Every other tier (ipv6 netns cgroup qemu lab kernel-lab containerd) fails the run unless
# KMR_ALLOW_SKIP lists it (comma-separated) or is "all", for a machine that lacks it.
set -euo pipefail

EXPECTED="kernel-module kubectl"
GATED="ipv6 netns cgroup qemu lab kernel-lab containerd"

summary_only=0
if [[ "${1:-}" == "--summary" ]]; then summary_only=1; shift; fi
[[ $# -eq 1 ]] || { echo "usage: $0 [--summary] SKIP_LOG" >&2; exit 2; }
log="$1"

allow="${KMR_ALLOW_SKIP:-}"
declare -A allowed=()
if [[ -n "$allow" ]]; then
  IFS=',' read -r -a wanted <<<"$allow"
  for t in "${wanted[@]}"; do
    t="${t// /}"
    [[ -n "$t" ]] || continue
    if [[ "$t" != all && " $GATED " != *" $t "* ]]; then
      echo "skip-report: KMR_ALLOW_SKIP names an unknown tier '$t' (tiers: $GATED, or all)" >&2
      exit 2
    fi
    allowed[$t]=1
  done
fi

verdict() { # tier → expected | allowed | FAIL
  local tier="$1"
  if [[ " $EXPECTED " == *" $tier "* ]]; then echo expected
  elif [[ " $GATED " == *" $tier "* ]] && [[ -n "${allowed[all]:-}" || -n "${allowed[$tier]:-}" ]]; then echo allowed
  else echo FAIL
  fi
}

total=0 expected=0 permitted=0 failed=0
declare -A failed_tiers=()
lines=()
if [[ -s "$log" ]]; then
  while IFS=$'\t' read -r test tier why; do
    [[ -n "$test" ]] || continue
    v=$(verdict "$tier")
    total=$((total + 1))
    case "$v" in
      expected) expected=$((expected + 1)); tag="expected here" ;;
      allowed) permitted=$((permitted + 1)); tag="ALLOWED by KMR_ALLOW_SKIP" ;;
      *) failed=$((failed + 1)); failed_tiers[$tier]=1; tag="NOT ALLOWED" ;;
    esac
    lines+=("$(printf '  %-28s %-13s %s: %s' "[$tag]" "$tier" "$test" "$why")")
  done <"$log"
fi

if ((!summary_only)); then
  if [[ -n "$allow" ]]; then
    echo "!!! KMR_ALLOW_SKIP=$allow: skips of these tiers do not fail this run; CI must not set it !!!"
  fi
  if ((total)); then
    echo "tests that skipped (part of) their subject:"
    printf '%s\n' "${lines[@]}"
  fi
fi
line="skips: $total ($expected expected on this machine, $permitted allowed by KMR_ALLOW_SKIP${allow:+=$allow}, $failed not allowed)"
if ((failed)); then
  echo "$line — FAILED: tier(s) ${!failed_tiers[*]} did not run; install what they need, or set KMR_ALLOW_SKIP=<tier,…> on a machine that lacks it"
  exit 1
fi
echo "$line"
