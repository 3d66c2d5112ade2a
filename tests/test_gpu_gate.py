"""The GPU-readiness gate (bpo_fast.tools.gpu_check) cannot be fooled.

* Its verdicts: a row without ptxas data, a transient fault, narrow loads of the LM head's
  operands, a 32-bit product of a runtime integer, shared memory over the arch's own limit.
* A machine short of resources (EAGAIN starting ptxas, ENOMEM, a killed compiler or worker) is
  retried with back-off, never reported as a compile failure and never cached.
* Mutations of a copy of kernels/linear.py, compiled for real (no GPU needed) for one arch: a
  compile error, a spill, shared memory over the limit, a narrow load, a 32-bit product and a
  missing ptxas log each fail the gate; the unmutated copy passes.
"""

import collections
import errno
import json
import os
import signal
import subprocess

import pytest

from bpo_fast.tools import gpu_check as G

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

OK = dict(arch=80, regs=128, spill_stores=0, spill_loads=0, smem=100_000, loads={"cp16": 8},
          operand_loads={"h_ptr": {"cp16": 4}, "w_ptr": {"cp16": 4}}, i32_products=[],
          wide=["h_ptr", "w_ptr"])


# ----------------------------------------------------------------------------------------------
# verdicts
# ----------------------------------------------------------------------------------------------


def test_a_complete_row_passes():
    assert G.judge(OK) == []
    assert G.cacheable(OK)


def test_a_row_without_ptxas_data_fails():
    # the ptxas log did not come back: that is not "no spills"
    row = dict(OK, regs=None, spill_stores=None, spill_loads=None)
    assert G.judge(row) == ["no ptxas data (regs, spill_stores, spill_loads missing)"]
    assert not G.cacheable(row)
    assert G.judge(dict(OK, spill_loads=None))[0].startswith("no ptxas data")
    assert G.judge(dict(OK, smem=None)) == ["no shared-memory size"]
    assert G.judge(dict(OK, i32_products=None)) == ["no TTIR to check for 32-bit products"]


def test_spills_and_compile_errors_fail():
    assert G.judge(dict(OK, spill_stores=8, spill_loads=4)) == ["spills 8/4 B"]
    assert G.judge(dict(OK, error="PassManager::run failed")) == ["compile error"]
    assert not G.cacheable(dict(OK, error="PassManager::run failed"))


def test_each_arch_has_its_own_shared_memory_limit():
    assert {a: G.ARCHS[a].smem // 1024 for a in G.ARCHS} == {80: 163, 86: 99, 89: 99, 90: 227,
                                                             100: 227, 120: 99}
    row = dict(OK, smem=120 * 1024)
    for arch, fails in ((80, False), (86, True), (89, True), (90, False), (100, False),
                        (120, True)):
        why = G.judge(dict(row, arch=arch))
        assert bool(why) == fails and all(w.startswith("smem") for w in why), (arch, why)


def test_a_transient_row_fails_without_being_a_compile_error():
    row = dict(arch=90, transient="BlockingIOError: [Errno 11] Resource temporarily unavailable",
               tries=7)
    (why,) = G.judge(row)
    assert why.startswith("no result") and "not a compile failure" in why
    assert not G.cacheable(row)


def test_narrow_loads_are_judged_on_the_hidden_and_weight_loads_only():
    # 2-byte loads of the bias (V = 32001: no 16-byte vectors) are not the operands' loads
    assert G.judge(dict(OK, loads={"cp16": 8, "ld2": 64})) == []
    (why,) = G.judge(dict(OK, operand_loads={"h_ptr": {"cp4": 8}, "w_ptr": {"cp16": 4}}))
    assert why == "narrow loads of h_ptr {'cp4': 8}"
    (why,) = G.judge(dict(OK, operand_loads={"h_ptr": {"cp16": 4}, "w_ptr": {"ld2": 32}}))
    assert why.startswith("narrow loads of w_ptr")
    # a launch that promises no 16-byte rows is not judged; one that does must show its loads
    assert G.judge(dict(OK, wide=[], operand_loads={"h_ptr": {"ld2": 8}})) == []
    assert G.judge(dict(OK, operand_loads={"h_ptr": {}, "w_ptr": {"cp16": 4}})) == [
        "no global loads of h_ptr found"]


def test_int32_products_of_runtime_integers_fail():
    (why,) = G.judge(dict(OK, i32_products=["%out = %pid_s * %S at linear.py:308"]))
    assert why.startswith("32-bit products of runtime integers") and "%S" in why


def test_ptxas_and_ptx_parsing():
    log = ("ptxas-blackwell info    : Used 168 registers, used 1 barriers, 16 bytes smem\n"
           "    24 bytes stack frame, 16 bytes spill stores, 8 bytes spill loads\n")
    r = G._parse_ptxas(log)
    assert (r["regs"], r["spill_stores"], r["spill_loads"], r["static_smem"]) == (168, 16, 8, 16)
    assert G._parse_ptxas("")["regs"] is None
    ptx = "\n".join([
        "\t.loc\t1 231 13, function_name $L__info_string0, inlined_at 1 300 15",
        "\tcp.async.cg.shared.global [ %r86 + 0 ], [ %rd56 + 0 ], 0x10, %r87;",
        "\t.loc\t1 300 20",
        "\t@%p9 ld.global.b16 { %rs1 }, [ %rd80 + 0 ];",
        "\t@%p9 ld.global.L1::evict_last.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd8 + 0 ];",
        "\tld.shared.b32 %r5, [%r6];",
        '\t.file\t1 "/x/linear.py"'])
    assert G._global_loads(ptx) == [("/x/linear.py", 231, "cp16"), ("/x/linear.py", 300, "ld2"),
                                    ("/x/linear.py", 300, "ld16")]


def test_int32_products_are_read_from_the_ttir():
    ttir = """#loc5 = loc("/k/linear.py":308:11)
module {
  tt.func public @k(%x_ptr: !tt.ptr<f32> {tt.divisibility = 16 : i32}, %S: i32, %H: i32 {tt.divisibility = 16 : i32}) attributes {noinline = false} {
    %c64_i32 = arith.constant 64 : i32 loc(#loc1)
    %pid = tt.get_program_id x : i32 loc(#loc1)
    %rows = arith.muli %pid, %c64_i32 : i32 loc(#loc1)
    %out = arith.muli %pid, %S : i32 loc(#loc5)
    %hs = tt.splat %H : i32 -> tensor<32xi32> loc(#loc1)
    %ks = tt.make_range {end = 32 : i32, start = 0 : i32} : tensor<32xi32> loc(#loc1)
    %p = arith.muli %ks, %hs : tensor<32xi32> loc(#loc6)
    %ks64 = arith.extsi %ks : tensor<32xi32> to tensor<32xi64> loc(#loc1)
    %h64 = arith.extsi %hs : tensor<32xi32> to tensor<32xi64> loc(#loc1)
    %q = arith.muli %ks64, %h64 : tensor<32xi64> loc(#loc1)
    tt.return loc(#loc1)
  } loc(#loc)
} loc(#loc)
#loc6 = loc(callsite(#loc7 at #loc5))
#loc7 = loc("/k/linear.py":221:40)
"""
    assert G._i32_products(ttir) == ["%out = %pid * %S at linear.py:308",
                                     "%p = %ks * %H at linear.py:221"]
    assert G._i32_products("module {}") is None


# ----------------------------------------------------------------------------------------------
# faults of the machine: retried, never a finding, never cached
# ----------------------------------------------------------------------------------------------


def _ptxas_killed():
    try:
        try:
            raise subprocess.CalledProcessError(-signal.SIGKILL, ["ptxas"])
        except subprocess.CalledProcessError:
            raise RuntimeError("`ptxas` failed with error code -9")  # Triton's PTXASError
    except RuntimeError as e:
        return e


@pytest.mark.parametrize("exc", [
    BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable"),
    OSError(errno.ENOMEM, "Cannot allocate memory"),
    MemoryError(),
    _ptxas_killed(),
], ids=["EAGAIN", "ENOMEM", "MemoryError", "ptxas-killed"])
def test_transient_faults_are_retried_with_backoff(monkeypatch, exc):
    calls, pauses = [], []

    def flaky(job, done):
        calls.append(job["id"])
        if len(calls) < 3:
            raise exc
        return dict(OK, spec="s")

    monkeypatch.setattr(G, "_compile_one", flaky)
    monkeypatch.setattr(G.time, "sleep", pauses.append)
    row = G._compile_retrying({"id": 0}, {})
    assert "error" not in row and "transient" not in row and row["regs"] == 128
    assert len(calls) == 3 and len(pauses) == 2 and pauses[1] > pauses[0]


def test_a_persistent_transient_fault_gives_a_transient_row(monkeypatch):
    def busy(job, done):
        raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")

    monkeypatch.setattr(G, "_compile_one", busy)
    monkeypatch.setattr(G.time, "sleep", lambda s: None)
    row = G._compile_retrying({"id": 0}, {})
    assert set(row) == {"transient", "tries"} and row["tries"] == len(G.BACKOFF_S) + 1
    assert "Errno 11" in row["transient"]


def test_a_real_compile_error_is_not_retried(monkeypatch):
    calls = []

    def broken(job, done):
        calls.append(1)
        raise RuntimeError("PassManager::run failed")

    monkeypatch.setattr(G, "_compile_one", broken)
    assert G._compile_retrying({"id": 0}, {}) == {"error": "RuntimeError: PassManager::run failed"}
    assert calls == [1]
    assert G.transient_reason(subprocess.CalledProcessError(255, ["ptxas"])) is None
    assert G.transient_reason(OSError(errno.ENOENT, "no such file")) is None


def _rows(jobs):
    return [dict(OK, id=j["id"], triton="3.9.0", src="h") for j in jobs]


def test_a_killed_worker_is_replaced(monkeypatch, tmp_path):
    """The worker is killed (OOM) after the first job; a fresh one compiles the rest."""
    calls = []

    def proc(version, path, jobs, tmpdir, tag, env=None):
        calls.append([j["id"] for j in jobs])
        if len(calls) == 1:
            return _rows(jobs[:1]), -signal.SIGKILL, "", True
        return _rows(jobs), 0, "", True

    monkeypatch.setattr(G, "_worker_process", proc)
    monkeypatch.setattr(G.time, "sleep", lambda s: None)
    rows = G._run_worker("3.9.0", "", [{"id": i} for i in range(4)], str(tmp_path), 0)
    assert calls == [[0, 1, 2, 3], [1, 2, 3]]
    assert sorted(r["id"] for r in rows) == [0, 1, 2, 3]
    assert all(G.judge(r) == [] for r in rows)


def test_a_job_that_keeps_killing_its_worker_gets_a_transient_row(monkeypatch, tmp_path):
    def proc(version, path, jobs, tmpdir, tag, env=None):
        if jobs[0]["id"] == 1:  # always killed while compiling job 1
            return [], -signal.SIGKILL, "Killed", True
        return _rows(jobs[:1]), -signal.SIGKILL, "", True

    monkeypatch.setattr(G, "_worker_process", proc)
    monkeypatch.setattr(G.time, "sleep", lambda s: None)
    rows = {r["id"]: r for r in G._run_worker("3.9.0", "", [{"id": i} for i in range(3)],
                                               str(tmp_path), 0)}
    assert sorted(rows) == [0, 1, 2]
    assert "killed" in rows[1]["transient"] and "error" not in rows[1]
    assert G.judge(rows[0]) == G.judge(rows[2]) == []


def test_a_worker_that_cannot_start_is_retried_and_a_crash_is_a_finding(monkeypatch, tmp_path):
    seq = [([], None, "BlockingIOError: [Errno 11]", False),  # fork failed: transient
           ([], -signal.SIGSEGV, "Segmentation fault", True),  # crashed on job 0 ...
           ([], -signal.SIGSEGV, "Segmentation fault", True)]  # ... twice: a finding

    def proc(version, path, jobs, tmpdir, tag, env=None):
        return seq.pop(0) if seq else (_rows(jobs), 0, "", True)

    monkeypatch.setattr(G, "_worker_process", proc)
    monkeypatch.setattr(G.time, "sleep", lambda s: None)
    rows = {r["id"]: r for r in G._run_worker("3.9.0", "", [{"id": 0}, {"id": 1}],
                                               str(tmp_path), 0)}
    assert "crashed" in rows[0]["error"] and G.judge(rows[0]) == ["compile error"]
    assert G.judge(rows[1]) == []


def test_only_complete_rows_are_cached(monkeypatch, tmp_path):
    """A transient row fails the run and is not cached; a cached entry without ptxas data (what
    an older gate could leave behind) is ignored and the launch is compiled again."""
    jobs = [dict(module="bpo_fast.kernels.linear", kernel=f"_k{i}", arch=80, args=[], kwargs={},
                 wide=[]) for i in range(3)]
    monkeypatch.setattr(G, "CACHE_ROOT", str(tmp_path))
    monkeypatch.setattr(G, "record_launches", lambda archs: [dict(j) for j in jobs])
    monkeypatch.setattr(G, "_installed_triton", lambda: "3.9.0")
    monkeypatch.setattr(G, "ensure_triton", lambda v, installed: "")
    monkeypatch.setattr(G, "_source_hash", lambda m: "h")
    monkeypatch.setattr(G, "_kernel_key", lambda m, k: "h")
    stale = {G._job_key(dict(jobs[2], id=2), "3.9.0", "h"): dict(OK, regs=None)}
    (tmp_path / "gpu-check.json").write_text(json.dumps(stale))
    compiled = []

    def run(version, path, share, tmpdir, idx):  # job 1 never gets a result
        compiled.extend(j["id"] for j in share)
        return [dict(id=1, triton=version, transient="BlockingIOError: [Errno 11]", tries=7)
                if j["id"] == 1 else dict(OK, id=j["id"], triton=version, src="h")
                for j in share]

    monkeypatch.setattr(G, "_run_worker", run)
    out = tmp_path / "table.json"
    assert G.main(["--versions", "3.9.0", "--archs", "80", "--jobs", "1", "--output",
                   str(out)]) == 1
    assert sorted(compiled) == [0, 1, 2]  # the stale entry was not trusted
    cache = json.loads((tmp_path / "gpu-check.json").read_text())
    keys = {G._job_key(dict(j, id=i), "3.9.0", "h") for i, j in enumerate(jobs)}
    cached = set(cache) & keys
    assert len(cached) == 2 and G._job_key(dict(jobs[1], id=1), "3.9.0", "h") not in cached
    table = json.loads(out.read_text())
    assert table["summary"]["n_failed"] == 1 and table["summary"]["n_transient"] == 1
    # the next run compiles only the row that had no result
    compiled.clear()
    G.main(["--versions", "3.9.0", "--archs", "80", "--jobs", "1", "--output", str(out)])
    assert compiled == [1]


# ----------------------------------------------------------------------------------------------
# versions and archs
# ----------------------------------------------------------------------------------------------


def test_supported_tritons_start_at_pyproject_floor():
    import re

    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        text = f.read()
    floors = set(re.findall(r'"triton>=([0-9.]+)"', text))
    assert floors == {G.OLDEST_TRITON.rsplit(".", 1)[0]}, floors
    assert G.OLDEST_TRITON == G.TRITON_VERSIONS[0]
    assert list(G.TRITON_VERSIONS) == sorted(G.TRITON_VERSIONS, key=G._version_key)
    assert {"3.6.0", "3.7.1", "3.8.0", "3.9.0"} <= set(G.TRITON_VERSIONS)


def test_every_arch_plans_the_tiles_of_its_own_table_row():
    torch = pytest.importorskip("torch")
    from bpo_fast.kernels import linear as KL

    assert set(G.ARCHS) == {80, 86, 89, 90, 100, 120}
    assert {a: KL.tile_arch(a) for a in (75, 80, 86, 87, 89, 90, 100, 103, 120, 121)} == {
        75: 80, 80: 80, 86: 80, 87: 80, 89: 80, 90: 90, 100: 100, 103: 100, 120: 120, 121: 120}
    # sm_120 and sm_100 have rows of their own: some of sm_90's tiles spill there
    assert KL.tile_config("fwd", torch.bfloat16, 120) != KL.tile_config("fwd", torch.bfloat16, 90)
    assert KL.tile_config("det", torch.bfloat16, 100) != KL.tile_config("det", torch.bfloat16, 90)
    jobs = G.record_launches((86, 120), launchers=(G._launch_linear,))
    for arch in (86, 120):
        fwd = {(j["kwargs"]["BM"]["i"], j["kwargs"]["BV"]["i"], j["kwargs"]["BK"]["i"])
               for j in jobs if j["arch"] == arch and j["kernel"] == "_fused_fwd_kernel"}
        assert fwd == {KL.tile_config("fwd", dt, arch)[:3]
                       for dt in (torch.float32, torch.bfloat16)}, arch


def test_the_deterministic_vocabulary_pass_plans_its_own_row_where_it_has_one():
    torch = pytest.importorskip("torch")
    from bpo_fast.kernels import linear as KL

    f32 = torch.float32
    # sm_80's float32 vocabulary pass spills at the grad_hidden pass's tiles (Triton 3.6/3.7.1);
    # elsewhere, and for 2-byte dtypes, both passes share the "det" row
    for cap in (False, True):
        assert KL.tile_config("det_vocab", f32, 86, cap) != KL.tile_config("det", f32, 86, cap)
        for arch, dt in ((90, f32), (120, f32), (80, torch.bfloat16)):
            assert KL.tile_config("det_vocab", dt, arch, cap) == KL.tile_config("det", dt, arch,
                                                                              cap)
    jobs = G.record_launches((80,), launchers=(G._launch_linear,))
    tiles = collections.defaultdict(set)
    for j in jobs:
        kw = j["kwargs"]
        if j["kernel"] == "_fused_bwd_det_kernel" and kw["PREC"]["s"] == "ieee":
            tiles[kw["ROWS"]["b"], kw["SOFTCAP"]["b"]].add(
                (kw["BM"]["i"], kw["BV"]["i"], kw["BK"]["i"], kw["num_warps"]["i"]))
    for cap in (False, True):
        assert tiles[True, cap] == {KL.tile_config("det", f32, 80, cap)[:4]}
        assert tiles[False, cap] == {KL.tile_config("det_vocab", f32, 80, cap)[:4]}


# ----------------------------------------------------------------------------------------------
# mutations of a kernel copy, compiled for real
# ----------------------------------------------------------------------------------------------

# (name, text in kernels/linear.py, its replacement, launch changes, dtype); the launch is the
# forward that the launcher plans for sm_80 (float32: a small kernel, ~1 s to compile)
MUTANTS = [
    ("control", None, None, {}, "float32"),
    ("compile_error", "    pid_s = tl.program_id(1)\n",
     "    pid_s = tl.program_id(1) + undefined_name\n", {}, "float32"),
    # a tile whose float32 accumulator cannot live in 255 registers per thread
    ("spill", None, None, dict(BM=128, BV=128), "float32"),
    # 8 stages (7 buffers) of 128x64 + 128x64 bf16 operands: 224 KB (sm_80 allows 163)
    ("smem", None, None, dict(BK=64, num_stages=8), "bfloat16"),
    # the alignment hint of the hidden rows dropped: 4-byte loads where 16 were promised
    ("narrow_load", "        roff = tl.multiple_of(roff, ROW_ALIGN)\n", "        pass\n", {},
     "float32"),
    # an output offset formed in 32 bits again
    ("int32_product", "    out = pid_s.to(tl.int64) * S + rows\n", "    out = pid_s * S + rows\n",
     {}, "float32"),
]
WHY = {"compile_error": "compile error", "spill": "spills", "smem": "smem",
       "narrow_load": "narrow loads of h_ptr", "int32_product": "32-bit products",
       "no_ptxas_log": "no ptxas data"}


@pytest.fixture(scope="module")
def mutant_rows(tmp_path_factory):
    pytest.importorskip("triton.backends.nvidia")
    tmp = tmp_path_factory.mktemp("gate-mutants")
    src = open(os.path.join(ROOT, "kernels", "linear.py")).read()
    import torch

    from bpo_fast.kernels import linear as KL

    sink = []
    with G._recording(80, sink):  # the launches the launcher makes for an A100
        for dt in (torch.float32, torch.bfloat16):
            S, H, V = 1000, 2048, 32000
            KL.fused_forward(*(torch.empty(*shape, dtype=t, device="meta") for shape, t in (
                ((S, H), dt), ((S,), torch.int64), ((V, H), dt), ((V,), dt),
                ((S,), torch.int64))), 1.0)
    base = {j["args"][0]["t"]: dict(j, arch=80) for j in sink}
    jobs = []
    for i, (name, old, new, launch, dtype) in enumerate(MUTANTS):
        text = src
        if old is not None:
            assert src.count(old) == 1, name  # the mutation still applies to the kernel
            text = src.replace(old, new)
        (tmp / f"gate_mutant_{name}.py").write_text(text)
        kwargs = dict(base[dtype]["kwargs"], **{k: {"i": v} for k, v in launch.items()})
        jobs.append(dict(base[dtype], module=f"gate_mutant_{name}", kwargs=kwargs, id=i))
    env = G._worker_env(str(tmp), str(tmp), "m")
    rows, rc, err, _ = G._worker_process("installed", str(tmp), jobs, str(tmp), "m", env=env)
    assert rc == 0 and len(rows) == len(jobs), err
    # the control again with ptxas's log switched off: the row has no register/spill data
    env = dict(G._worker_env(str(tmp), str(tmp), "n"), TRITON_DUMP_PTXAS_LOG="0")
    (quiet,), rc, err, _ = G._worker_process("installed", str(tmp), jobs[:1], str(tmp), "n",
                                             env=env)
    assert rc == 0, err
    out = {name: dict(r, arch=80, wide=j["wide"]) for (name, *_), r, j in zip(MUTANTS, rows, jobs)}
    out["no_ptxas_log"] = dict(quiet, arch=80, wide=jobs[0]["wide"])
    return out


def test_the_unmutated_kernel_copy_passes(mutant_rows):
    row = mutant_rows["control"]
    assert G.judge(row) == [], row
    assert row["wide"] == ["h_ptr", "w_ptr"] and row["operand_loads"]["h_ptr"]


@pytest.mark.parametrize("name", sorted(WHY))
def test_the_gate_fails_each_mutation(mutant_rows, name):
    why = G.judge(mutant_rows[name])
    assert any(w.startswith(WHY[name]) for w in why), (name, why, mutant_rows[name])
    assert not G.cacheable(mutant_rows[name]) or name in ("spill", "smem", "narrow_load",
                                                          "int32_product")
