export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}   # keeps what the caller added (e.g. the CUTLASS wheel)
S="compute-sanitizer --error-exitcode 9"
F8='import cupy, numpy, ml_dtypes; from tessera_cp import fp8; x = cupy.asarray(numpy.random.default_rng(0).standard_normal(4099).astype(ml_dtypes.bfloat16)); fp8.encode(x[1:], "e4m3", saturate=True); fp8.encode(x, "e5m2"); cupy.cuda.Device().synchronize(); print("fp8 ok")'
# tests/nn in two halves (about 6.5 min in one process on the H100 in session 16, with the gemv_mma variants)
(timeout 570 python3 -m pytest -q -m gpu tests/nn/test_attention.py tests/nn/test_casted.py > $OUT/gpu_nn.log 2>&1; echo "rc=$?" >> $OUT/gpu_nn.log) &
(timeout 570 python3 -m pytest -q -m gpu tests/nn --ignore=tests/nn/test_attention.py --ignore=tests/nn/test_casted.py > $OUT/gpu_nn2.log 2>&1; echo "rc=$?" >> $OUT/gpu_nn2.log) &
(timeout 570 python3 -m pytest -q -m gpu tests --ignore=tests/nn > $OUT/gpu_rest.log 2>&1; echo "rc=$?" >> $OUT/gpu_rest.log) &
(for t in tests/gpu_sanitize_issue4.py tests/gpu_sanitize_casted.py tests/models/gpu_sanitize_llama.py; do timeout 300 $S --tool memcheck python3 $t > $OUT/san_$(basename $t .py).log 2>&1; echo "rc=$?" >> $OUT/san_$(basename $t .py).log; done
 timeout 200 $S --tool memcheck python3 bench/tune_loss.py sanitize > $OUT/san_loss_mem.log 2>&1; echo "rc=$?" >> $OUT/san_loss_mem.log
 timeout 200 $S --tool racecheck python3 bench/tune_loss.py sanitize > $OUT/san_loss_race.log 2>&1; echo "rc=$?" >> $OUT/san_loss_race.log
 timeout 100 $S --tool memcheck python3 -c "$F8" > $OUT/san_fp8.log 2>&1; echo "rc=$?" >> $OUT/san_fp8.log) &
wait
for f in $OUT/*.log; do echo "== $(basename $f): $(grep -E 'passed|failed|ERROR SUMMARY|error|rc=' $f | tail -3 | tr '\n' ' ')"; done
grep -h -E "^(FAILED|ERROR)" $OUT/gpu_*.log | head -30
