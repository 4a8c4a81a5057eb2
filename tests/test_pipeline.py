"""The one pipeline: order, custom finish steps, failures as rows, storage faults, abandon."""
from __future__ import annotations

import errno

import numpy as np
import pytest

from engine.classifier import Classifier, Job
from engine.config import load_settings, replace
from engine.pipeline import Pipeline
from tests.helpers import write_image


@pytest.fixture(scope="module")
def classifier(tiny_model_path):
    s = load_settings(None)
    s = replace(s, model=replace(s.model, path=tiny_model_path),
                inference=replace(s.inference, batch_size=4, runtime="tensorflow"))
    return Classifier.from_settings(s)


def _jobs(folder, n, bad=()):
    jobs = []
    for i in range(n):
        path = folder / f"{i:03d}.png"
        if i in bad:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("not an image", encoding="utf-8")
        else:
            write_image(path, fmt="PNG", width=40, height=30, seed=i)
        jobs.append(Job(path, path.name, f"p-{i:04d}"))
    return jobs


def _chunks(jobs, n=4):
    return [jobs[i:i + n] for i in range(0, len(jobs), n)]


def test_batches_come_out_in_order_with_custom_finish(classifier, tmp_path):
    jobs = _jobs(tmp_path / "in", 18, bad={3, 10})
    seen = []

    def finish(job, image, probs, cam):
        assert cam is not None and cam.ndim == 2 and np.isclose(probs.sum(), 1.0)
        return ("ok", job.job_id)

    with Pipeline(classifier, finish=finish, on_error=lambda job, exc: ("bad", job.job_id),
                  prefetch=1) as pipe:
        for tag, records in pipe.run(_chunks(jobs)):
            seen.append((tag, records))
    assert [tag for tag, _ in seen] == list(range(5))
    flat = [r for _, records in seen for r in records]
    assert [job_id for _, job_id in flat] == [j.job_id for j in jobs]
    assert [kind for kind, _ in flat].count("bad") == 2 and flat[3][0] == flat[10][0] == "bad"


def test_a_failing_finish_step_is_that_files_error_row(classifier, tmp_path):
    jobs = _jobs(tmp_path / "in", 6)

    def finish(job, image, probs, cam):
        if job.job_id.endswith("2"):
            raise ValueError("renderer bug")
        return classifier.finish(job, image, probs, cam, tmp_path / "out")

    with Pipeline(classifier, finish=finish) as pipe:
        results = [r for _, rs in pipe.run(_chunks(jobs)) for r in rs]
    assert [r.status for r in results].count("error") == 1
    assert "internal error while writing results (ValueError: renderer bug)" in results[2].error


def test_a_failing_model_call_gives_error_rows_and_the_run_goes_on(classifier, tmp_path):
    jobs = _jobs(tmp_path / "in", 8)
    calls = {"n": 0}
    real = classifier.infer

    def flaky(images):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("device lost")
        return real(images)

    classifier.infer = flaky
    try:
        with Pipeline(classifier, tmp_path / "out") as pipe:
            results = [r for _, rs in pipe.run(_chunks(jobs)) for r in rs]
    finally:
        del classifier.infer
    assert [r.status for r in results] == ["error"] * 4 + ["ok"] * 4
    assert "internal error while classifying (RuntimeError: device lost)" in results[0].error


def test_storage_fault_propagates_and_abandon_returns_what_was_in_flight(classifier, tmp_path):
    jobs = _jobs(tmp_path / "in", 12)

    def finish(job, image, probs, cam):
        if job.job_id == "p-0005":
            raise OSError(errno.ENOSPC, "No space left on device")
        return job.job_id

    pipe = Pipeline(classifier, finish=finish, prefetch=1)
    try:
        for i, chunk in enumerate(_chunks(jobs)):
            pipe.submit(chunk, tag=f"b{i}")
        assert pipe.waiting == 3
        pipe.advance()
        pipe.advance()
        done = []
        with pytest.raises(OSError) as info:
            for tag, records in pipe.completed():
                done.append(tag)
        assert info.value.errno == errno.ENOSPC and done == ["b0"]
        assert pipe.in_flight == 2            # b1 (the failed one) and b2 stay in flight
        assert pipe.abandon() == ["b1", "b2"]
        assert pipe.in_flight == 0 and list(pipe.completed()) == []
    finally:
        pipe.close()


def test_a_classifier_takes_only_what_it_uses(classifier, tmp_path):
    """A runtime plus picture options, decode limits and the uncertainty band: no settings tree.
    Small overlays only, sharing the runtime of a classifier built from settings."""
    from engine.config import DecodeSettings
    from engine.render import PictureOptions

    small = Classifier(classifier.runtime, PictureOptions(outputs=("overlay",), max_side=32,
                                                          format="png", annotate=False),
                       DecodeSettings(max_image_pixels=10_000), uncertain_below=1.0, batch_size=3,
                       threads=2)
    assert not hasattr(small, "settings") and small.outputs == ("overlay",)
    jobs = _jobs(tmp_path / "in", 4)
    big = tmp_path / "in" / "big.png"
    write_image(big, fmt="PNG", width=200, height=100, seed=9)   # 20,000 px over the limit
    results = small.process([*jobs, Job(big, "big.png", "p-big")], out_dir=tmp_path / "out")
    assert [r.status for r in results] == ["ok"] * 4 + ["error"]
    assert all(r.label == "uncertain" and list(r.pictures) == ["overlay"] for r in results[:4])
    assert all(r.pictures["overlay"].endswith(".overlay.png") for r in results[:4])
    assert sorted(p.name for p in (tmp_path / "out" / "gradcam").iterdir()) == sorted(
        r.pictures["overlay"].split("/")[-1] for r in results[:4])
    from PIL import Image

    with Image.open(tmp_path / "out" / results[0].pictures["overlay"]) as im:
        assert max(im.size) <= 32
