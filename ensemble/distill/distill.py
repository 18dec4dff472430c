"""`gitseg distill`: one student network that learns from the labels and from an ensemble.

1. Teacher targets (`write_teacher`): for every labelled case-day outside the holdout, the
   ensemble's out-of-fold probabilities (its configurations, weights and TTA; each case-day's
   from the fold models that did not train on it), resized to the cache size. On request, the
   unlabelled `test/` case-days predicted by the whole ensemble, as pseudo-labels.
2. The student configuration trained on every fold, with the teacher and on the labels alone
   (students.py: Ray Train runs, the refit's own), each leaving out-of-fold predictions.
3. `build_student`: post-processing tuned on each student's pooled out-of-fold predictions; the
   distilled student's best-validation fold model becomes a one-member ensemble folder, usable by
   `gitseg predict`; the holdout table compares the student, the student on labels alone, the
   ensemble's best single model and the ensemble, each with its latency measured here.

`distill` chains the three; it is what `gitseg distill` runs.

What the out-of-fold targets leave in: a student fold run validates on fold f while learning
from the teacher's predictions of other folds, made by fold models that trained on fold f. Its
validation and OOF scores can be slightly optimistic through that; the holdout, which no teacher
or student saw, is not.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

from ensemble.distill.folders import student_folder, work_folder
from ensemble.distill.students import train_students
from ensemble.model import EnsembleModel, member_from_checkpoint, sha256
from ensemble.predict.input_checks import training_data
from ensemble.selection.evaluate import TUNED_SINGLE, evaluate_holdout, final_variant, paired_gain, scores_from_rows
from ensemble.selection.latency import checkpoint_ms, folds_by_score
from ensemble.selection.members import configurations_of, load_refit, oof_probs, oof_score, oof_volumes
from ensemble.selection.postprocess import tune
from gitseg import __version__, records, teacher
from gitseg.checkpoint import default_device
from gitseg.config import Config, load_config, to_dict
from gitseg.config_checks import check_config
from gitseg.data.cache import Cache, pack_masks, preprocess_volume, resize_masks, resize_probs
from gitseg.data.uwmgi import CLASSES, index_root, volume_from_rows
from gitseg.files import folder_lock, staged_folder, write_text_atomic
from gitseg.infer import TTA_SETS, device_name
from gitseg.oof import oof_tta_sets
from gitseg.progress import bar, note, say
from gitseg.records import (
    ENSEMBLE_MANIFEST,
    EVALUATION,
    MANIFEST_FORMAT,
    SEARCH_RECORD,
    ConfigurationRow,
    EnsembleManifest,
    EnsembleScores,
    Evaluation,
    OofScores,
    Preprocessing,
    RefitRecord,
    SearchRecord,
    Selection,
    Source,
)
from gitseg.tables import csv_text, format_table

DISTILL_RECORD = "distill.json"
STUDENT_ROW, LABELS_ROW = "student", "student, labels only"
SINGLE_ROW, ENSEMBLE_ROW = "best single model", "ensemble"


@dataclasses.dataclass
class Plan:
    """What `gitseg distill` reads and where it writes."""

    ensemble: Path             # the teacher ensemble folder
    manifest: EnsembleManifest
    run_dir: Path              # the search folder the ensemble was built from
    cache: Cache
    student: Config            # the student configuration, on the ensemble's cache
    out: Path                  # the student's ensemble folder
    work: Path                 # teacher targets and the student's Train runs
    tta: str                   # the student's TTA at prediction time

    @property
    def teacher(self) -> Path:
        return self.work / "teacher"


def distill(ensemble_dir, student_yaml, overrides: list[str] | None = None, out=None, tta: str = "none",
            pseudo_labels=None, reference: bool = True, log=say) -> dict:
    """`gitseg distill`: the teacher's targets from the ensemble in `ensemble_dir`, the student
    configuration `student_yaml` (+ `overrides`) trained on every fold with them (and, with
    `reference`, on the labels alone), then the student's one-member ensemble folder `out` (default
    `<ensemble>-student` beside it; work files in `<out>.work`). `pseudo_labels`: a data root whose
    test/ case-days the ensemble labels for the student too ("" for the cache's own root). Returns
    distill.json's content: the holdout table and what the teacher adds."""
    p = plan(ensemble_dir, student_yaml, overrides, out=out, tta=tta)
    search = records.load(SearchRecord, p.run_dir / SEARCH_RECORD, "the ensemble's search folder has moved")
    pseudo_root = None if pseudo_labels is None else (pseudo_labels or p.cache.manifest["source"])
    source = write_teacher(p, pseudo_root, log=log)
    folds = sorted({p.cache.entries[cd]["fold"] for cd in p.cache.case_days()})
    record = train_students(search, to_dict(p.student), str(p.teacher.resolve()), folds, p.work, reference=reference,
                            log=log)
    return build_student(p, record, source, log=log)


def plan(ensemble_dir, student_yaml, overrides: list[str] | None = None, out=None, tta: str = "none") -> Plan:
    """Check everything `gitseg distill` needs before any work: the ensemble, its search folder and
    cache, and the student configuration (on the ensemble's cache: the same folds and holdout)."""
    ensemble = Path(ensemble_dir)
    manifest = records.load(EnsembleManifest, ensemble / ENSEMBLE_MANIFEST,
                            "point --ensemble at a folder made by `gitseg ensemble`")
    run_dir = Path(manifest.source.run)
    cache = Cache(manifest.source.cache)
    if tta not in TTA_SETS:
        raise ValueError(f"unknown TTA {tta!r}; choose one of {', '.join(TTA_SETS)}")
    student = load_config(student_yaml, [*(overrides or []), f"data.cache={cache.root}", "data.teacher=null"])
    check_config(student, cache)
    out = student_folder(ensemble, out)
    if out.resolve() == ensemble.resolve():
        raise ValueError(f"--out {out} is the teacher ensemble's folder; choose another")
    return Plan(ensemble, manifest, run_dir, cache, student, out, work_folder(out), tta)


def teacher_members(p: Plan):
    """(configurations, weights, TTA) of the ensemble as its source run's refit configurations: the
    TTA of its out-of-fold probabilities is the ensemble's when the refit wrote it, else the refit's."""
    run = load_refit(p.run_dir)
    by_name = {c.name: c for c in run.configurations}
    weights: dict[str, float] = {}
    for m in p.manifest.members:
        if m.configuration not in by_name:
            raise ValueError(f"{p.ensemble}: member configuration {m.configuration} has no complete refit in "
                             f"{p.run_dir}; rebuild the ensemble with `gitseg ensemble --run {p.run_dir}`")
        weights[m.configuration] = m.weight
    tta = p.manifest.tta if p.manifest.tta in oof_tta_sets(run.refit.tta) else run.refit.tta
    return [by_name[n] for n in weights], list(weights.values()), tta


def _teacher_source(p: Plan, pseudo_root) -> dict:
    return {"ensemble": str(p.ensemble.resolve()), "manifest_sha256": sha256(p.ensemble / ENSEMBLE_MANIFEST),
            "cache": str(p.cache.root.resolve()),
            "pseudo_labels": str(Path(pseudo_root).resolve()) if pseudo_root else None}


def write_teacher(p: Plan, pseudo_root=None, log=say) -> dict:
    """The teacher folder of `p` (gitseg.teacher): the ensemble's OOF probabilities for every
    labelled case-day outside the holdout and, with `pseudo_root`, the ensemble's predictions of
    its `test/` case-days. Kept when a complete one from the same ensemble and inputs is there."""
    source = _teacher_source(p, pseudo_root)
    try:
        if teacher.Teacher(p.teacher).source == source:
            log(f"distill: teacher targets already in {p.teacher}")
            return source
    except (FileNotFoundError, ValueError):
        pass
    if p.teacher.exists():
        shutil.rmtree(p.teacher)
    configs, weights, tta = teacher_members(p)
    size = p.cache.size
    entries = {}
    case_days = p.cache.case_days()
    progress = bar(len(case_days), "distill: teacher targets", unit="case-day")
    for case_day in case_days:
        probs = oof_probs(configs, weights, case_day, p.cache, tta)
        teacher.write_case_day(p.teacher, case_day, resize_probs(probs, size))
        entries[case_day] = {"slices": int(probs.shape[1]), "pseudo": False}
        progress.update()
    progress.close()
    pseudo = 0
    if pseudo_root:
        model = EnsembleModel.load(p.ensemble)
        slices, problems = index_root(pseudo_root, "test")
        for problem in problems:
            log(f"distill: pseudo-labels: skipped: {problem}")
        days = list(dict.fromkeys(slices["case_day"]))
        if not days:
            raise ValueError(f"{pseudo_root}/test holds no case-days to pseudo-label; give --pseudo-labels a UWMGI "
                             f"root with a test/ folder, or leave it out")
        progress = bar(len(days), "distill: pseudo-labels", unit="case-day")
        for case_day in days:
            if case_day in p.cache.entries:
                raise ValueError(f"{pseudo_root}/test/{case_day} is also a case-day of the cache {p.cache.root}; "
                                 f"pseudo-labels are for unlabelled case-days only")
            volume = volume_from_rows(slices[slices["case_day"] == case_day])
            probs, masks = model.predict_scan(volume.image)
            teacher.write_case_day(p.teacher, case_day, resize_probs(probs, size),
                                   image=preprocess_volume(volume.image, size),
                                   packed_masks=pack_masks(resize_masks(masks, (size, size))))
            entries[case_day] = {"slices": int(volume.image.shape[0]), "pseudo": True}
            pseudo += 1
            progress.update()
        progress.close()
    teacher.write_record(p.teacher, size, source, entries)
    log(f"distill: teacher targets for {len(case_days)} labelled case-days (out-of-fold, TTA {tta}, "
        f"{len(configs)} configuration(s))" + (f" and {pseudo} pseudo-labelled case-days" if pseudo else "")
        + f" in {p.teacher}")
    return source


# ---------------------------------------------------------------------------------------------
# The student's ensemble folder and the holdout table


def tuned_score(steps: list[dict]) -> float:
    """The OOF score post-processing reached: each step starts where the last kept one ended."""
    last = steps[-1]
    return last["after"] if last["kept"] else last["before"]


def _network_ms(checkpoint: Path, tta: str, volume, out_size, device) -> float:
    return checkpoint_ms(checkpoint, [tta], volume, out_size, device)[tta]


def build_student(p: Plan, record: RefitRecord, teacher_source: dict, log=say) -> dict:
    """The student's one-member ensemble folder `p.out` and its holdout table; returns distill.json."""
    with folder_lock(p.out, "gitseg distill"):
        return _build_student(p, record, teacher_source, log)


def _build_student(p: Plan, record: RefitRecord, teacher_source: dict, log) -> dict:
    started = time.perf_counter()
    configs, problems = configurations_of(record)
    by_rank = {c.rank: c for c in configs}
    trained = {m.rank for m in record.models}  # rank 1, the labels-only reference, unless --no-reference
    if 0 not in by_rank or (1 in trained and 1 not in by_rank):
        raise ValueError(f"the student runs in {p.work} lack a fold model: {'; '.join(problems)}")
    student, labels_only = by_rank[0], by_rank.get(1)
    students = [c for c in (student, labels_only) if c is not None]
    own = p.tta if p.tta in oof_tta_sets(record.tta) else None
    tuned = {}
    for conf in students:
        conf.cv_score = oof_score([conf], [1.0], p.cache, tta=own)
        tuned[conf.rank] = tune(oof_volumes([conf], [1.0], p.cache, tta=own), log=log if conf is student else note)
        log(f"distill: {conf.trial_id}: OOF score {conf.cv_score:.4f} at threshold 0.5, "
            f"{tuned_score(tuned[conf.rank][1]):.4f} tuned")
    post, steps = tuned[0]
    fold = folds_by_score(student)[0]  # one network: the fold model with the best validation score

    with staged_folder(p.out) as staging:
        (staging / "models").mkdir()
        file = f"models/student_fold{fold}.pt"
        shutil.copy2(student.folds[fold].checkpoint, staging / file)
        member = member_from_checkpoint(staging / file, file, 1.0, "student")
        member.sha256 = sha256(staging / file)
        manifest = EnsembleManifest(
            format=MANIFEST_FORMAT, gitseg_version=__version__, created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            source=Source(run=str(p.work.resolve()), cache=str(p.cache.root.resolve()),
                          teacher_ensemble=str(p.ensemble.resolve())),
            members=[member], tta=p.tta, postprocess=post.to_dict(),
            preprocessing=Preprocessing(sizes=[member.size], normalisation=p.cache.manifest["normalisation"],
                                        classes=list(CLASSES), windows=[[member.channels, member.stride]]),
            metric=p.manifest.metric,
            selection=Selection(method="distilled", topk=1, log=[], problems=problems,
                                why=f"the student trained with the teacher {p.ensemble}: its fold {fold} model "
                                    f"(best validation score); post-processing tuned on all its folds' OOF",
                                configurations=[ConfigurationRow(
                                    name=c.trial_id, oof_score=c.cv_score, selected=c is student,
                                    fold_scores={str(f): m.score for f, m in sorted(c.folds.items())})
                                    for c in configs]),
            scores=EnsembleScores(oof=OofScores(selected_at_half=student.cv_score, tuning_steps=steps,
                                                case_days=len(p.cache.case_days()))),
            timings={}, training_data=training_data(p.cache, p.cache.case_days()))
        records.save(manifest, staging / ENSEMBLE_MANIFEST)
        oof = {c.trial_id: {"at_0.5": c.cv_score, "tuned": tuned_score(tuned[c.rank][1]),
                            "postprocess": tuned[c.rank][0].to_dict()} for c in students}
        result = {"teacher": teacher_source, "student_config": to_dict(p.student), "tta": p.tta,
                  "student_fold": fold, "oof": oof}
        if p.cache.case_days(holdout=True):
            reference = (labels_only, tuned[1][0]) if labels_only else None
            result.update(holdout_table(p, EnsembleModel.load(staging), reference, log))
        else:
            log("distill: the cache has no holdout case-days; no holdout table")
        manifest.timings["total_s"] = time.perf_counter() - started
        records.save(manifest, staging / ENSEMBLE_MANIFEST)
        write_text_atomic(staging / DISTILL_RECORD, json.dumps(result, indent=1, default=float))
        if "models" in result:
            write_text_atomic(staging / "distill_holdout.csv", csv_text(result["models"]))
    log(f"distill: wrote {p.out} (one network; `gitseg predict --ensemble {p.out}` uses it)")
    return result


def holdout_table(p: Plan, model: EnsembleModel, reference, log) -> dict:
    """The four models on the holdout, each with post-processing tuned on its own OOF and its
    latency measured here: the student, the student on labels alone (`reference`: its configuration
    and post-processing; None: the row is left out), and the teacher ensemble's best single fold
    model and the ensemble as built (their rows read from its evaluation.json)."""
    holdout = p.cache.case_days(holdout=True)
    teacher_scores = p.manifest.scores.holdout
    if teacher_scores is None or sorted(teacher_scores.case_days) != sorted(holdout):
        raise ValueError(f"{p.ensemble} was not evaluated on the holdout of {p.cache.root}; rebuild it with "
                         f"`gitseg ensemble` on this cache")
    evaluation = records.load(Evaluation, p.ensemble / EVALUATION, "rebuild the ensemble with `gitseg ensemble`")
    variants = {STUDENT_ROW: (model.members, p.tta, model.post)}
    if reference:
        labels_only, labels_post = reference
        fold = folds_by_score(labels_only)[0]
        checkpoint = labels_only.folds[fold].checkpoint
        variants = {LABELS_ROW: ([member_from_checkpoint(checkpoint, str(checkpoint.resolve()), 1.0, "labels-only")],
                                 p.tta, labels_post), **variants}
    ev = evaluate_holdout(model, p.cache, variants, log)
    rows = {STUDENT_ROW: ev.rows[STUDENT_ROW], **({LABELS_ROW: ev.rows[LABELS_ROW]} if reference else {}),
            SINGLE_ROW: evaluation.rows[TUNED_SINGLE], ENSEMBLE_ROW: evaluation.rows[final_variant(p.manifest.tta)]}

    # Latency: every network timed here, on one volume, with its own TTA.
    device = default_device()
    case_day = holdout[0]
    entry = p.cache.entries[case_day]
    volume, out_size = p.cache.image(case_day), (entry["height"], entry["width"])
    run = load_refit(p.run_dir)
    single_conf, single_fold = teacher_scores.best_single_fold_model.split(" fold ")
    single_ckpt = next(c for c in run.configurations if c.name == single_conf).folds[int(single_fold)].checkpoint
    single_tta = next(r.tta for r in teacher_scores.ablation if r.variant == TUNED_SINGLE)
    ms = {STUDENT_ROW: _network_ms(model.folder / model.members[0].file, p.tta, volume, out_size, device),
          SINGLE_ROW: _network_ms(single_ckpt, single_tta, volume, out_size, device),
          ENSEMBLE_ROW: sum(_network_ms(p.ensemble / m.file, p.manifest.tta, volume, out_size, device)
                            for m in p.manifest.members)}
    what = {STUDENT_ROW: (f"the distilled student, fold {model.members[0].fold} model", p.tta),
            SINGLE_ROW: (f"the teacher's {teacher_scores.best_single_fold_model}", single_tta),
            ENSEMBLE_ROW: (f"the teacher ensemble, {len(p.manifest.members)} networks", p.manifest.tta)}
    if reference:
        ms[LABELS_ROW] = _network_ms(checkpoint, p.tta, volume, out_size, device)
        what[LABELS_ROW] = (f"the same configuration on the labels alone, fold {fold} model", p.tta)
    table = []
    for name, r in rows.items():
        s = scores_from_rows(r)
        gain = paired_gain(r, rows[SINGLE_ROW]) if name != SINGLE_ROW else None
        table.append({"model": name, "detail": what[name][0], "tta": what[name][1], "ms_per_slice": ms[name],
                      "latency_vs_ensemble": ms[name] / ms[ENSEMBLE_ROW], "score": s["score"], "dice": s["dice"],
                      "hausdorff": s["hausdorff"], "gain_over_single": gain.gain if gain else 0.0,
                      "gain_ci95_low": gain.ci95[0] if gain else 0.0,
                      "gain_ci95_high": gain.ci95[1] if gain else 0.0})
        log(f"distill: holdout {name}: {s['score']:.4f} ({ms[name]:.2f} ms per slice)")
    score = {r["model"]: r["score"] for r in table}
    ensemble_gain = score[ENSEMBLE_ROW] - score[SINGLE_ROW]
    student_gain = score[STUDENT_ROW] - score[SINGLE_ROW]
    # The student's share of what the ensemble adds over one network, at the student's share of its
    # latency; undefined when the ensemble adds nothing.
    share = student_gain / ensemble_gain if ensemble_gain > 0 else None
    teacher_adds = paired_gain(rows[STUDENT_ROW], rows[LABELS_ROW]) if reference else None
    if teacher_adds:
        log(f"distill: what the teacher adds (student minus labels only): {teacher_adds.gain:+.4f} "
            f"[{teacher_adds.ci95[0]:+.4f}, {teacher_adds.ci95[1]:+.4f}] over {teacher_adds.cases} cases")
    log(f"distill: the ensemble adds {ensemble_gain:+.4f} over the best single model, the student {student_gain:+.4f}"
        + (f" ({share:.0%} of it)" if share is not None else "")
        + f" at {ms[STUDENT_ROW] / ms[ENSEMBLE_ROW]:.0%} of the ensemble's latency")
    return {"models": table, "holdout_case_days": holdout, "device": device_name(device),
            "student_share_of_ensemble_gain": share,
            "teacher_adds": to_dict(teacher_adds) if teacher_adds else None,
            "latency_ratio": ms[STUDENT_ROW] / ms[ENSEMBLE_ROW]}


def holdout_text(result: dict) -> str:
    """distill.json's holdout table as the terminal shows it."""
    return format_table([{k: r[k] for k in ("model", "tta", "ms_per_slice", "latency_vs_ensemble", "score", "dice",
                                            "hausdorff", "gain_over_single")} for r in result["models"]],
                        floats="{:.4f}")
