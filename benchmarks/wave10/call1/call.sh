# Prepared at the end of wave 9 for the next session's first device call (~4-5 min): the `peelmask` A/B (NOTES.md
# "Prepared, not measured (end of wave 9): peelmask"). The variant's code is not in csrc/ (its GPU checks have not
# run); it is peelmask.patch beside this script (commit 5ac170d's csrc change), applied here to the device's copy
# of the tree. Correctness of both Q/K modes first (check_variants in the ab part). If it wins: apply the patch in
# the repository, make it the default bit (csrc/liteattn.h, default_variant), drop the other loop copy in
# mainloop.cuh, and run `bash tools/gpu_suite.sh build tests sanitize bench` on that version.
set -u
git apply benchmarks/wave10/call1/peelmask.patch || { echo "peelmask.patch does not apply to this csrc/"; exit 1; }
CMAKE_ARGS='-DLITEATTN_AB_VARIANTS=7171@128;7169@64' AB_VARIANTS=default,peelmask AB_REPEATS=3 \
  OUT=$OUT bash tools/gpu_suite.sh build ab
