# Sourced by scripts/demo and scripts/test: one cache for every clone on the machine.
# LIBTORCH is the canonical cache path (not the clone's .cache/libtorch symlink) so a
# second clone (CI's) reuses the compiled torch-sys instead of rebuilding it.
export AMTHAL_CACHE=${AMTHAL_CACHE:-$HOME/.cache/amthal}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$AMTHAL_CACHE/target}
export LIBTORCH=$AMTHAL_CACHE/site/libtorch-cpu
