"""``annotate`` under ``accelerate launch`` with 2 CPU processes: contiguous shards, merged in row order."""

import json
import subprocess
import sys
import textwrap

import pytest
from transformers import pipeline

import hf_repalign  # noqa: F401
from hf_repalign.legend import MarginVector
from hf_repalign.testing import tiny_model, tiny_tokenizer

SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    from transformers import pipeline
    import hf_repalign
    from hf_repalign.legend import MarginVector, LegendMarginPipeline
    from hf_repalign.legend.annotate import distributed_state
    from hf_repalign.testing import tiny_model, tiny_tokenizer

    out = Path(sys.argv[1])
    state = distributed_state()
    tokenizer = tiny_tokenizer()
    model = tiny_model("llama", vocab_size=len(tokenizer))
    vec = MarginVector.from_pretrained(out / "vec")
    rows = json.loads((out / "rows.json").read_text())
    seen = []
    encode_rows = LegendMarginPipeline.encode_rows
    def recording_encode_rows(self, examples, rows=None, **kwargs):
        seen.extend(rows)
        return encode_rows(self, examples, rows, **kwargs)
    LegendMarginPipeline.encode_rows = recording_encode_rows
    pipe = pipeline("legend-margin", model=model, tokenizer=tokenizer, margin_vector=vec, device="cpu")
    result = pipe.annotate(rows, num_bins=3, output=out / "annotated.jsonl", checkpoint_every=3, batch_size=2)
    (out / f"rank{state.process_index}.json").write_text(json.dumps({"rows": seen, "margins": list(result["margin_raw"])}))
    """
)


@pytest.mark.slow
def test_annotate_with_two_cpu_processes(tmp_path, free_port):
    tokenizer = tiny_tokenizer()
    model = tiny_model("llama", vocab_size=len(tokenizer))
    prompts = [f"question number {i} " + "x" * (i % 4) for i in range(10)]
    vec = MarginVector.fit(model, tokenizer, prompts[:4], ["no"] * 4, ["sure thing", "ok", "yes", "fine, here"])
    vec.save_pretrained(tmp_path / "vec")
    rows = [{"id": i, "prompt": p, "chosen": "no " * (1 + i % 3), "rejected": f"yes {i}"} for i, p in enumerate(prompts)]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    (tmp_path / "run.py").write_text(SCRIPT)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port), str(tmp_path / "run.py"), str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    expected = pipeline("legend-margin", model=model, tokenizer=tokenizer, margin_vector=vec, device="cpu").annotate(
        rows, num_bins=3, progress=False)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    # Chunks of 3 rows: [0,3) [3,6) [6,9) [9,10) -> process 0 takes the first two, process 1 the rest.
    assert ranks[0]["rows"] == list(range(6)) and ranks[1]["rows"] == list(range(6, 10))
    for rank in ranks:
        assert rank["margins"] == pytest.approx(expected["margin_raw"], abs=1e-5)
    written = [json.loads(line) for line in (tmp_path / "annotated.jsonl").read_text().splitlines()]
    assert [r["id"] for r in written] == list(range(10))
    assert [r["margin"] for r in written] == pytest.approx(list(expected["margin"]), abs=1e-12)
    assert not (tmp_path / ".annotated.jsonl.parts").exists()
