"""tools/sanitize.py's reading of compute-sanitizer output (CPU only; the tools themselves run on the GPU).

The logs below have the shape of compute-sanitizer 2025 racecheck / memcheck output, with made-up kernels."""

from tool_module import load_tool


def hazard(kind, address, reader, read_site, writer, write_site):
    return (f"========= Error: Potential {kind} hazard detected at __shared__ {address} in block (3,0,0) :\n"
            f"=========     Read Thread ({reader},0,0) at void demo::kernel<int>(int)+0x40 in {read_site}\n"
            f"=========     Write Thread ({writer},0,0) at void demo::reader<int>(const T1 &)+0x94 in {write_site}\n"
            "=========     Current Value : 10, Incoming Value : 255\n"
            "=========     Saved host backtrace up to driver entry point at kernel launch time\n")


RACY = ("case a: rel err 1e-3 ok\n"
        + hazard("WAR", "0x100", 159, "/src/csrc/sched.cuh:108", 32, "/src/csrc/sched.cuh:143")
        + hazard("WAR", "0x101", 223, "/src/csrc/sched.cuh:108", 32, "/src/csrc/sched.cuh:143")
        + hazard("RAW", "0x200", 7, "/src/csrc/loop.cuh:12", 40, "/src/csrc/loop.cuh:30")
        + "worker done: 0 failing cases\n"
        "========= RACECHECK SUMMARY: 3 hazards displayed (17 errors, 0 warnings)\n")
CLEAN = "worker done: 0 failing cases\n========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)\n"


def test_racecheck_summary_pass_and_fail():
    sanitize = load_tool("sanitize")
    assert sanitize.parse("racecheck", CLEAN) == ("0 hazards (0 errors, 0 warnings)", True)
    summary, passed = sanitize.parse("racecheck", RACY)
    assert not passed and summary == "3 hazards (17 errors, 0 warnings)"
    # A clean tool whose worker failed (a case off the reference) fails too.
    summary, passed = sanitize.parse("memcheck", "worker done: 1 failing cases\n========= ERROR SUMMARY: 0 errors\n")
    assert not passed and "worker failed" in summary


def test_hazards_grouped_by_source_lines():
    sites = load_tool("sanitize").hazard_sites(RACY)
    assert sites == [
        "2 x WAR: Read sched.cuh:108 (threads 159, 223) / Write sched.cuh:143 (threads 32)",
        "1 x RAW: Read loop.cuh:12 (threads 7) / Write loop.cuh:30 (threads 40)",
    ]
    assert load_tool("sanitize").hazard_sites(CLEAN) == []
