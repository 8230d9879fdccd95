# Wave 10 call 3: the whole cuda suite on HEAD (latevote in csrc/ as a variant; the default SASS unchanged)
OUT=$OUT bash tools/gpu_suite.sh build tests
