"""`lowbit bench ncu`: parsing Nsight Compute's raw CSV page and the table made of it (hand-made
pages; the profiling itself needs the GPU machine), and the one-line errors for bad cases."""
import pytest

from lowbit.bench import ncu
from lowbit.errors import LowbitError

PAGE = """==PROF== Connected to process 1 (python3)
"ID","Kernel Name","gpu__time_duration.sum","dram__bytes.sum.per_second","launch__registers_per_thread",\
"smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio",\
"smsp__average_warps_issue_stalled_wait_per_issue_active.ratio",\
"smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio"
"","","ns","byte/s","register/thread","inst","inst","inst"
"0","_paged_decode_kernel","226,144","1,507,452,667,327.01","168","1.46","1.68","0"
==PROF== Disconnected from process 1
"""


def test_raw_page_parsed_with_units_and_thousands_separators():
    m = ncu.parse(PAGE)
    assert m["Kernel Name"] == ("", "_paged_decode_kernel")
    assert m["gpu__time_duration.sum"] == ("ns", "226,144")
    assert ncu.parse("==PROF== no kernels were profiled\n") == {}


def test_table_scales_columns_and_orders_stalls_largest_first():
    (head, rule, row) = ncu.table([("decode-kv4:64:4096", ncu.parse(PAGE))]).splitlines()
    cells = [c.strip() for c in row.strip("|").split("|")]
    cols = [c.strip() for c in head.strip("|").split("|")]
    got = dict(zip(cols, cells))
    assert got["us"] == "226" and got["DRAM TB/s"] == "1.51" and got["regs"] == "168"
    assert got["DRAM %"] == "-"  # not on this page
    # a stall of 0 cycles is no stall; the rest largest first
    assert got["stalls (cycles / issue)"] == "wait 1.7, long_scoreboard 1.5"


@pytest.mark.parametrize("case, message", [("bogus:1", "unknown case 'bogus'"), ("w4a8:x", "bad case"),
                                            ("decode-kv4:64", "bad case"), ("w4a16:4096", "no kernel at M=4096")])
def test_bad_cases_are_one_line_errors(case, message):
    pytest.importorskip("torch")
    with pytest.raises(LowbitError, match=message):
        ncu.build(case)
