"""End to end through the CLI: `lvd pretrain` (tiny, 3 steps) -> `lvd eval knn` -> `lvd export`,
then the exported folder loaded by transformers gives the teacher's CLS features."""

import json

import pytest
import torch

from lvd.cli.main import main
from lvd.datasets import load_fashion_mnist, write_labelled_folder, write_shards
from lvd.pretrain.checkpoint import load_teacher_backbone
from lvd.pretrain.failures import EXIT_REPEATS


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    x, y = load_fashion_mnist("test")
    write_shards(x[:48], root / "shards", samples_per_shard=16, size=56)
    write_labelled_folder(x[100:160], y[100:160], root / "train", size=56)
    write_labelled_folder(x[200:230], y[200:230], root / "val", size=56)
    return root


def test_pretrain_eval_export(data, capsys):
    out = data / "run"
    rc = main(
        [
            "pretrain",
            "--shards",
            str(data / "shards"),
            "--recipe",
            "tiny",
            "--out",
            str(out),
            "--max-steps",
            "3",
            "--batch-size",
            "4",
            "--num-workers",
            "0",
        ]
    )
    assert rc == 0
    assert "trained steps 0..3 of recipe tiny" in capsys.readouterr().out
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1  # log_every 10: last step
    assert (out / "checkpoints" / "step_0000003" / ".metadata").is_file()

    rc = main(
        [
            "eval",
            "knn",
            "--checkpoint",
            str(out),
            "--train",
            str(data / "train"),
            "--val",
            str(data / "val"),
            "--k",
            "5",
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "checkpoints" / "step_0000003" / "eval_knn.json").read_text())
    assert result["n_train"] == 60 and result["n_val"] == 30 and result["k"] == 5
    assert f"{100 * result['top1']:.2f}%" in printed and 0.0 <= result["top1"] <= 1.0

    rc = main(["export", str(out), "--hf", str(data / "hf")])
    assert rc == 0
    from transformers import AutoModel

    hf = AutoModel.from_pretrained(data / "hf").eval()
    ours = load_teacher_backbone(out)
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        expected = ours(x).cls_BD
        got = hf(pixel_values=x).pooler_output
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_pretrain_reports_missing_shards(tmp_path):
    with pytest.raises(SystemExit, match="missing shards"):
        main(["pretrain", "--shards", str(tmp_path / "none"), "--recipe", "tiny", "--out", str(tmp_path / "o")])


def test_pretrain_refuses_batch_size_one_before_training(data, tmp_path):
    # KoLeo needs a nearest neighbour within each rank's batch: refused with one line,
    # before any model is built or file written (was a traceback from inside the loss)
    with pytest.raises(SystemExit) as e:
        main(
            [
                "pretrain",
                "--shards",
                str(data / "shards"),
                "--recipe",
                "tiny",
                "--out",
                str(tmp_path / "o"),
                "--batch-size",
                "1",
                "--num-workers",
                "0",
            ]
        )
    message = str(e.value)  # printed on stderr; the exit code says a relaunch would repeat it
    assert e.value.code == EXIT_REPEATS
    assert message.startswith("lvd pretrain: error: --batch-size 1:") and "\n" not in message
    assert "KoLeo" in message and "--batch-size 2" in message
    assert not (tmp_path / "o").exists()


def test_pretrain_on_two_ranks_then_resume(data, capsys):
    """`--nproc-per-node 2`: two gloo ranks with FSDP2 write one sharded checkpoint that a
    single process reads, and a 2-rank `--resume` continues from it."""
    out = data / "run2"
    args = [
        "pretrain",
        "--shards",
        str(data / "shards"),
        "--recipe",
        "tiny",
        "--out",
        str(out),
        "--batch-size",
        "4",
        "--num-workers",
        "0",
        "--nproc-per-node",
        "2",
    ]
    assert main([*args, "--max-steps", "2"]) == 0
    assert "trained steps 0..2 of recipe tiny" in capsys.readouterr().out
    meta = json.loads((out / "checkpoints" / "step_0000002" / "meta.json").read_text())
    assert meta["world_size"] == 2
    assert main([*args, "--max-steps", "3", "--resume"]) == 0
    assert "trained steps 2..3 of recipe tiny" in capsys.readouterr().out
    assert load_teacher_backbone(out).cls_token.shape[-1] == 192
