"""See what the data engine makes of your data before spending hours training on it.

    tuner list-dataset-format
    tuner check-custom-dataset CFG        every row validated; each stage shown for a few rows
    tuner log-dataset CFG --show all      the packed training sequences as the model sees them
"""

from __future__ import annotations

import json

from tuner.config import Config, DataConfig
from tuner.data.dataset import build_sequences
from tuner.data.encode import IGNORE, encode_row
from tuner.data.formats import FORMAT_COLUMNS, FORMATS, RowError
from tuner.data.preference import prepare_pair, prepare_unpaired, tokenize_pairs, tokenize_unpaired
from tuner.data.sources import BAD_ROW
from tuner.data.template_check import TemplateReport, compare_templates
from tuner.data.templates import get_template
from tuner.data.tokenized import TokenStats, resolve_map_fns, rows_of
from tuner.errors import TunerError

SHOW = ("text", "masked_text", "input_ids", "labels")


def list_formats() -> str:
    width = max(map(len, FORMATS))
    lines = [f"{name:<{width}}  {FORMAT_COLUMNS[name]}" for name in FORMATS]
    return "\n".join(lines + [f"{'auto':<{width}}  detected from the columns of the first row of each dataset"])


def masked_text(tokenizer, ids: list[int], labels: list[int]) -> str:
    """The text with every run of untrained tokens replaced by a marker."""
    out, run = [], []
    for token, label in zip(ids, labels):
        if label == IGNORE:
            run.append(token)
            continue
        if run:
            out.append(f"[{len(run)} masked]")
            run = []
        out.append(tokenizer.decode([token]))
    if run:
        out.append(f"[{len(run)} masked]")
    return "".join(out)


def check_custom_dataset(cfg: Config, tokenizer, samples: int = 2, max_errors: int = 20) -> tuple[str, int]:
    """Validate every row; show each stage for the first `samples` rows. Returns (report, bad rows)."""
    data = cfg.data
    template = get_template(data.template, tokenizer)
    map_fns = resolve_map_fns(data, TokenStats())
    lines, errors, rows, shown = [], [], 0, 0
    for _, (place, line, row, key) in rows_of(data):
        rows += 1
        if BAD_ROW in row:
            errors.append(f"{place}:{line}: {row[BAD_ROW]}")
            continue
        try:
            mapped = map_fns[key](row)
            if isinstance(mapped, dict) and "chosen" in mapped:  # a preference pair: both answers
                pair = tokenize_pairs([prepare_pair(mapped, template, data.system)], tokenizer, data.max_length)[0]
                encodings = list(zip(("chosen", "rejected"), pair))
            elif isinstance(mapped, dict) and "completion" in mapped:  # KTO: one answer, desirable or not
                example = tokenize_unpaired([prepare_unpaired(mapped, template, data.system)], tokenizer,
                                            data.max_length)[0]
                encodings = [("desirable" if mapped.get("desirable") else "undesirable", example)]
            else:
                encodings = [("", encode_row(mapped, tokenizer, template, data.system, data.max_length,
                                             keep_stages=True))]
        except RowError as e:
            errors.append(f"{place}:{line}: {e}")
            continue
        except (KeyError, TypeError, AttributeError, ValueError) as e:  # a user's map function tripping on a row
            errors.append(f"{place}:{line}: map function failed: {e!r}")
            continue
        if shown < samples:
            shown += 1
            lines += [f"=== {place}:{line} ===",
                      f"--- raw row\n{json.dumps(row, ensure_ascii=False)[:2000]}",
                      f"--- messages\n{json.dumps(encodings[0][1].stages.get('messages', mapped), ensure_ascii=False)[:2000]}"]
            for answer, encoded in encodings:
                ids = encoded.ids.tolist()
                labels = [t if ok else IGNORE for t, ok in zip(ids, encoded.trained.tolist())]
                which = f" ({answer})" if answer else ""
                lines += [f"--- rendered text{which}\n{tokenizer.decode(ids) if answer else encoded.stages['text']}",
                          f"--- input_ids{which} ({len(ids)}{', truncated' if encoded.truncated else ''})\n{ids}",
                          f"--- labels{which} ({sum(encoded.trained)} trained)\n{labels}",
                          f"--- trained text{which}\n{masked_text(tokenizer, ids, labels)}"]
            lines.append("")
    if errors:
        lines.append(f"{len(errors)} of {rows} rows are bad:")
        lines += errors[:max_errors]
        if len(errors) > max_errors:
            lines.append(f"... and {len(errors) - max_errors} more")
        return "\n".join(lines), len(errors)
    sequences, report = _sequences(cfg, tokenizer)
    first = sequences.plan[0] if hasattr(sequences, "plan") else None
    if first is None:  # KTO: one example per sequence
        lines.append("--- not packed: one example per sequence, each with its KL row (its prompt, another answer)")
    elif cfg.preference is not None:
        lines.append(f"--- packed: sequence 0 holds {len(first)} pair(s)")
    else:
        lines.append(f"--- packed: sequence 0 holds {len(first)} piece(s) of lengths {[b - a for _, a, b in first]}")
    lines += [f"All {rows} rows are valid. {report.summary()}", report.details()]
    return "\n".join(lines), 0


def log_dataset(cfg: Config, tokenizer, show: str = "all", num: int = 1) -> str:
    """The first `num` training sequences, as text, masked text, ids and/or labels."""
    if show not in (*SHOW, "all"):
        raise TunerError(f"--show must be one of {', '.join(SHOW)}, all; got {show!r}")
    sequences, report = _sequences(cfg, tokenizer)
    lines = [report.summary()]
    for k in range(min(num, len(sequences))):
        sample = sequences[k]
        if hasattr(sample, "desirable"):  # KTO
            parts = [(f", {'desirable' if sample.desirable else 'undesirable'}", sample.ids, sample.labels)]
        elif cfg.preference is not None:  # each answer of each pair, in the order they are packed
            parts = [(f", pair {index} {'rejected' if answer else 'chosen'}", ids, labels)
                     for ids, labels, answer, index in sample.parts]
        else:
            parts = [("", sample.input_ids, sample.labels)]
        for where, ids, labels in parts:
            views = {"text": tokenizer.decode(ids), "masked_text": masked_text(tokenizer, ids, labels),
                     "input_ids": str(ids), "labels": str(labels)}
            for name in SHOW if show == "all" else (show,):
                lines.append(f"=== sequence {k}{where}: {name} ===\n{views[name]}")
    return "\n".join(lines)


def _sequences(cfg: Config, tokenizer):
    if cfg.preference is not None and cfg.preference.method == "kto":
        from tuner.data.kto import build_kto_sequences
        return build_kto_sequences(cfg.data, tokenizer, cfg.train.seed, say=lambda _: None)
    if cfg.preference is not None:
        from tuner.data.pairs import build_pair_sequences
        return build_pair_sequences(cfg.data, tokenizer, cfg.train.seed, say=lambda _: None)
    return build_sequences(cfg.data, tokenizer, cfg.train.seed, say=lambda _: None)


def conversations(data: DataConfig, limit: int | None = None, skip_bad: bool = False) -> list[dict]:
    """The first `limit` rows of the data as {'messages', 'tools'}, through the configured formats
    and map functions; rows that are not conversations (pretraining text) are left out. A bad row
    is an error naming the file, line and field (or left out: `skip_bad`)."""
    from tuner.data.formats import check_messages

    map_fns = resolve_map_fns(data, TokenStats())
    found = []
    for _, (place, line, row, key) in rows_of(data):
        try:
            if BAD_ROW in row:
                raise RowError("", row[BAD_ROW])
            mapped = map_fns[key](row)
            if "messages" not in mapped:
                continue
            # a preference pair: prompt + chosen; a KTO example: prompt + its answer
            messages = mapped["messages"] + mapped.get("chosen", mapped.get("completion", []))
            found.append({"messages": check_messages(messages), "tools": mapped.get("tools") or row.get("tools")})
        except (KeyError, TypeError, AttributeError, ValueError) as e:  # RowError, or a map function tripping
            if skip_bad:
                continue
            raise TunerError(f"{place}:{line}: {e if isinstance(e, RowError) else f'map function failed: {e!r}'}") from None
        if limit and len(found) >= limit:
            break
    return found


def check_template(template_name: str, tokenizer, data: DataConfig) -> TemplateReport:
    """The named template against the tokenizer's own chat template on every row of `data`."""
    rows = conversations(data)
    if not rows:
        raise TunerError(f"{data.path}: no conversation rows to compare (pretraining text has no template)")
    return compare_templates(get_template(template_name, tokenizer), tokenizer, rows)


def template_report_text(report: TemplateReport) -> str:
    lines = [report.summary()]
    if report.differences:
        lines.append(f"first difference: {report.differences[0].describe()}")
    return "\n".join(lines)
