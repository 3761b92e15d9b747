#!/usr/bin/env bash
# Install the Debian packages that the slurm tests (tests/test_slurm.py) start a one-node cluster
# from. Idempotent: does nothing when every binary is already there. Needs root and apt-get.
set -euo pipefail

PACKAGES=(slurmctld slurmd slurm-client munge)
BINARIES=(slurmctld slurmd sbatch srun scontrol squeue sinfo scancel munged munge unmunge)

missing=0
for b in "${BINARIES[@]}"; do
    command -v "$b" >/dev/null 2>&1 || [ -x "/usr/sbin/$b" ] || missing=1
done
if [ "$missing" = 0 ]; then
    echo "ci_slurm_setup: slurm and munge already installed"
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "ci_slurm_setup: installing ${PACKAGES[*]} needs root" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
# Try the cached package lists first; refresh them only if that fails (fresh images have none).
if ! apt-get install -y --no-install-recommends "${PACKAGES[@]}"; then
    apt-get update
    apt-get install -y --no-install-recommends "${PACKAGES[@]}"
fi
# munge's postinst normally creates the key; make sure one exists (a container may skip it).
if [ ! -s /etc/munge/munge.key ]; then
    if command -v mungekey >/dev/null 2>&1; then
        mungekey --create --force
    else
        dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
fi
echo "ci_slurm_setup: installed ${PACKAGES[*]}"
