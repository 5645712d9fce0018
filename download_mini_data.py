"""
Get the data for the whole pipeline (tokenizer -> pretrain -> SFT -> distill -> DPO -> GRPO), sized for a preset.

  python download_mini_data.py                      # cpu: a starter set from the HF hub, minutes
  python download_mini_data.py --preset 12gb        # data at the scale of the 12gb training presets (GBs, hours)
  python download_mini_data.py --lang zh            # the Chinese sets
  python download_mini_data.py --offline true       # the built-in generated data (cpu preset), no network at all

Writes UTF-8 jsonl files, one object per line, into --out_dir (default data/):
  pretrain.jsonl pretrain_val.jsonl   {"text": ...}
  sft.jsonl      sft_val.jsonl        {"conversations": [{"role": "system"|"user"|"assistant", "content": ...}, ...]};
                                      online, sft.jsonl also holds a function-calling set's records: the assistant's
                                      calls as "tool_calls": [{"name", "arguments": {...}}], each result a turn of role
                                      "tool", the functions offered as "tools" (OpenAI's form); sft_val is chats only
  r1.jsonl       r1_val.jsonl         the same, every assistant reply "<think>\\n...\\n</think>\\n<final reply>", and a
                                      top-level "answer" string where the answer can be checked (a number or one word)
  dpo.jsonl      dpo_val.jsonl        preference pairs in a format records.py reads: online, each set's own (HH
                                      transcripts, or a "conversations" history + "chosen"/"rejected" ShareGPT
                                      messages); offline {"conversations": [user turn], "chosen", "rejected", "answer"}
  math.jsonl     math_val.jsonl       online only: grade-school word problems (GSM8K) for train_grpo.py, chat records
                                      with a number "answer" (the English ones with GSM8K's working as a think block)

Online, every stage is streamed with `datasets` straight to disk (memory stays flat), committed every
few thousand records to out_dir/download_state.json: interrupt it and run the same command again to
continue where it stopped; a finished stage is not fetched again. A stage's file is written as
`NAME.jsonl.partial` and renamed when complete. The free disk space needed is checked first.
Chats longer than about --online_max_tokens are skipped (a small model learns nothing from a 30-page
proof, and a reasoning trace cut at the context loses its answer); so are preference pairs whose prompt and
longer reply are.

Offline (--offline true, or automatically when the hub cannot be reached with --preset cpu): the
built-in generator of offline_data.py. --preset 12gb never falls back: the toy data would not be
what the preset needs, so it stops with one line instead.
"""
import json
import os
import re
import shutil
import socket
import sys
import urllib.parse
from dataclasses import dataclass, field
from typing import Optional

from tqdm import tqdm

from cli import UserError, parse_config, run_guarded
from offline_data import FILE_NAMES, GENERATORS, think_reply, write_jsonl, write_offline_data
from records import BadRecord, atomic_write, chat_messages, preference_pair


@dataclass
class DownloadConfig:
    preset: str = field(default="cpu", metadata={"help": "cpu: a starter set; 12gb: the 12gb presets' data"})
    out_dir: str = field(default="data", metadata={"help": "where the jsonl files are written"})
    lang: str = field(default="en", metadata={"help": "en or zh"})
    offline: bool = field(default=False, metadata={"help": "write the built-in generated data, no network"})
    seed: int = field(default=0, metadata={"help": "offline: generator seed"})
    pretrain_mb: float = field(default=3.5, metadata={"help": "offline: megabytes of pretraining text"})
    n_sft: int = field(default=4000, metadata={"help": "offline: chat conversations"})
    n_r1: int = field(default=4000, metadata={"help": "offline: reasoning problems"})
    n_dpo: int = field(default=2000, metadata={"help": "offline: preference pairs (a right and a wrong answer)"})
    n_val: int = field(default=300, metadata={"help": "validation records per stage (both modes)"})
    pretrain_tokens: int = field(default=0, metadata={
        "help": "online: stop the pretraining text at about this many tokens; 0: count documents instead"})
    online_pretrain: int = field(default=20000, metadata={"help": "online: pretraining documents; 0: no limit"})
    online_sft: int = field(default=5000, metadata={"help": "online: chat conversations; 0: all"})
    online_r1: int = field(default=2000, metadata={"help": "online: reasoning conversations; 0: all"})
    online_dpo: int = field(default=5000, metadata={"help": "online: preference pairs; 0: all"})
    online_math: int = field(default=0, metadata={"help": "online: word problems for train_grpo.py; 0: all"})
    online_max_tokens: int = field(default=2000, metadata={
        "help": "online: skip chats (sft, r1; dpo: prompt + longer reply) longer than about this many tokens, "
                "guessed from characters"})
    connect_timeout: float = field(default=3.0, metadata={"help": "seconds to wait for the hub before going offline"})


# The 12gb pretraining preset reads 20,000 steps x 65,536 tokens = 1.31B tokens: fetch a little more,
# and every chat, reasoning trace and preference pair of the sets (train_dpo.py's 12gb preset reads 1,000 steps
# x 64 pairs: about 1.5 epochs of the English set's 43,835; the Chinese set has 10,000, and train_dpo.py warns
# of the epochs that makes, with the --max_steps to pass instead).
PRESETS = {
    "cpu": {},
    "12gb": dict(pretrain_tokens=1_400_000_000, online_pretrain=0, online_sft=0, online_r1=0, online_dpo=0,
                 n_val=1000, online_max_tokens=1024),  # the 12gb context: longer traces would lose their answers
}

# ----------------------------------------------------------------------------------------------------------------
# Online: the hub sets of each preset, and how their records become ours


@dataclass(frozen=True)
class HubSet:
    path: str
    name: Optional[str] = None        # the dataset's config
    split: str = "train"
    val_split: Optional[str] = None   # None: the first n_val usable records are held out instead
    data_files: Optional[str] = None  # one file of a repository that holds several
    data_dir: Optional[str] = None    # one folder of a repository that holds several
    rows: int = 0                     # records in the split (from the dataset card), for the progress bar
    mb: float = 0.0                   # about what the whole split takes as our jsonl, for the disk check
    whole: bool = False               # a small set taken whole: the stage's sets before it leave room for its rows


# GSM8K (Cobbe et al. 2021): 7,473 train / 1,319 test word problems, each answer a whole number; the Chinese
# translation keeps the English fields and adds the question in Chinese and the bare answer.
GSM8K = HubSet("openai/gsm8k", "main", val_split="test", rows=7_473, mb=4)
GSM8K_ZH = HubSet("swulling/gsm8k_chinese", val_split="test", rows=7_473, mb=2)

# LLaMA-Factory's function-calling sets: 1k conversations of glaive-function-calling-v2 each (the Chinese one translated
# by GPT-3.5), ShareGPT turns (human, function_call, observation, gpt) and "tools" a JSON string of the functions.
# Every sft stage takes one whole, after its chats, so a model learns to call tools (and, where none fits, not to).
GLAIVE_EN = HubSet("llamafactory/glaive_toolcall_en", rows=1_000, mb=2.3, whole=True)
GLAIVE_ZH = HubSet("llamafactory/glaive_toolcall_zh", rows=1_000, mb=2.1, whole=True)

# Ids, configs, splits and fields as their dataset cards give them; tests/test_download_mini_data.py pins one
# record of each. A stage with several sets reads them in order until its limit (less the room a whole set after them
# keeps); its validation records come from the first.
HUB_SETS = {
    "cpu": {
        "en": {"pretrain": [HubSet("roneneldan/TinyStories", val_split="validation", rows=2_119_719, mb=1900)],
               "sft": [HubSet("yahma/alpaca-cleaned", rows=51_760, mb=45), GLAIVE_EN],
               "r1": [HubSet("bespokelabs/Bespoke-Stratos-17k", rows=16_710, mb=270)],
               "dpo": [HubSet("Anthropic/hh-rlhf", data_dir="helpful-base", val_split="test", rows=43_835, mb=75)],
               "math": [GSM8K]},
        "zh": {"pretrain": [HubSet("wikimedia/wikipedia", "20231101.zh", rows=1_384_748, mb=2600)],
               "sft": [HubSet("shibing624/alpaca-zh", rows=48_818, mb=35), GLAIVE_ZH],
               "r1": [HubSet("Congliu/Chinese-DeepSeek-R1-Distill-data-110k", rows=110_000, mb=680)],
               "dpo": [HubSet("llamafactory/DPO-En-Zh-20k", "zh", rows=10_000, mb=30)],
               "math": [GSM8K_ZH]},
    },
    "12gb": {
        "en": {"pretrain": [HubSet("HuggingFaceFW/fineweb-edu", "sample-10BT", rows=9_672_101, mb=46000)],
               "sft": [HubSet("HuggingFaceTB/smol-smoltalk", val_split="test", rows=460_341, mb=1800), GLAIVE_EN],
               "r1": [HubSet("bespokelabs/Bespoke-Stratos-17k", rows=16_710, mb=270)],
               "dpo": [HubSet("Anthropic/hh-rlhf", data_dir="helpful-base", val_split="test", rows=43_835, mb=75)],
               "math": [GSM8K]},
        "zh": {"pretrain": [HubSet("wikimedia/wikipedia", "20231101.zh", rows=1_384_748, mb=2600),
                            HubSet("HuggingFaceFW/fineweb-2", "cmn_Hani", rows=636_058_984, mb=1_480_000)],
               "sft": [HubSet("llamafactory/alpaca_gpt4_zh", rows=42_715, mb=30),
                       HubSet("shibing624/sharegpt_gpt4", data_files="sharegpt_zh_38K_format.jsonl", rows=38_535,
                              mb=250), GLAIVE_ZH],
               "r1": [HubSet("Congliu/Chinese-DeepSeek-R1-Distill-data-110k", rows=110_000, mb=680)],
               "dpo": [HubSet("llamafactory/DPO-En-Zh-20k", "zh", rows=10_000, mb=30)],
               "math": [GSM8K_ZH]},
    },
}
STAGES = ("pretrain", "sft", "r1", "dpo", "math")  # math is online only: offline, the r1 problems carry answers
# For turning --pretrain_tokens into characters before any tokenizer exists: on the low side of what
# BPE tokenizers of 8k-32k pieces give (English web text ~4-4.5, Chinese ~1.4-1.6), so the text is
# enough; train.py reports the real epochs from the shards' token count.
CHARS_PER_TOKEN = {"en": 4.0, "zh": 1.4}
BYTES_PER_CHAR = {"en": 1.0, "zh": 3.0}  # UTF-8 (Chinese characters take three bytes)
COMMIT_EVERY = 5000  # records between commits of the download state: a resume re-fetches at most this many
PAIR_FIELDS = ("prompt", "conversations", "chosen", "rejected")  # all records.py reads of a preference pair
STRATOS_REPLY = re.compile(r"<\|begin_of_thought\|>(.*?)<\|end_of_thought\|>\s*"
                           r"<\|begin_of_solution\|>(.*?)<\|end_of_solution\|>", re.S)


def boxed_answer(reply: str):
    """The last \\boxed{...} of a reply, if it is something a string match can check (a number or one word)."""
    start = reply.rfind("\\boxed{")
    if start < 0:
        return None
    depth, begin = 1, start + len("\\boxed{")
    for i in range(begin, len(reply)):
        depth += {"{": 1, "}": -1}.get(reply[i], 0)
        if depth == 0:
            answer = reply[begin:i].strip()
            return answer if re.fullmatch(r"-?\d+(?:\.\d+)?|[A-Za-z]\w*", answer) else None
    return None


def chat(turns, with_answer=False):
    """[(role, content)] -> our record; None when a role is unknown, a turn is empty or it ends with no reply."""
    if not turns or turns[-1][0] != "assistant" or any(r is None or not c.strip() for r, c in turns):
        return None
    record = {"conversations": [{"role": r, "content": c.strip()} for r, c in turns]}
    answer = boxed_answer(turns[-1][1].split("</think>")[-1]) if with_answer else None
    return {**record, "answer": answer} if answer else record


def text_of(rec, key) -> str:
    return str(rec.get(key) or "").strip()


def from_text(rec):
    return {"text": text_of(rec, "text")} if text_of(rec, "text") else None


def hub_turns(rec):
    """[(role, content)] of a chat record in any format records.py reads (alpaca, OpenAI messages,
    ShareGPT), or None when it is damaged, of another schema, or calls tools (from_tool_chat's: as pairs its calls
    would be lost): not usable."""
    try:
        fmt, messages, _ = chat_messages(rec)
    except (BadRecord, UserError):
        return None
    if not fmt or any(m["role"] == "tool" or "tool_calls" in m for m in messages):
        return None
    return [(m["role"], m["content"]) for m in messages]


def from_chat(rec):
    turns = hub_turns(rec)
    return chat(turns) if turns else None


def from_tool_chat(rec):
    """A chat that may call tools (LLaMA-Factory's ShareGPT: function_call and observation turns, "tools" a JSON string)
    as ours: the calls kept as the assistant's "tool_calls", each result a "tool" turn, the functions offered as "tools"
    (a record offering none is a plain chat). None when a call or the tool list is not valid JSON, a turn is empty, it
    ends with no assistant turn, or a result answers no call (a few of the Chinese set's translations write the call
    into the reply's text): training on those would teach calls that no parser reads."""
    try:
        fmt, messages, extra = chat_messages(rec)
    except (BadRecord, UserError):
        return None
    if not fmt or messages[-1]["role"] != "assistant":
        return None
    for before, m in zip([None] + messages, messages):
        if not (m["content"].strip() or m.get("tool_calls")) or \
                m["role"] == "tool" and not (before and (before["role"] == "tool" or before.get("tool_calls"))):
            return None
    conversations = [{**m, "content": m["content"].strip()} for m in messages]
    return {"conversations": conversations, **({"tools": extra["tools"]} if extra.get("tools") else {})}


def from_stratos(rec):
    # Its system prompt only explains the <|begin_of_thought|> markers, which become <think> here: dropped.
    turns = hub_turns({k: v for k, v in rec.items() if k != "system"}) or []
    for i, (role, text) in enumerate(turns):
        if role == "assistant":
            m = STRATOS_REPLY.search(text)
            if not m:
                return None
            turns[i] = (role, think_reply(m.group(1), m.group(2)))
    return chat(turns, with_answer=True)


def from_reasoning_fields(rec):
    reasoning, reply = text_of(rec, "reasoning_content"), text_of(rec, "content")
    if not reasoning or not reply:
        return None
    return chat([("user", text_of(rec, "input")), ("assistant", think_reply(reasoning, reply))], with_answer=True)


def from_gsm8k(rec):
    """GSM8K's "answer" is its working, calculator notes <<48/2=24>> and all, then "#### 72": the working becomes
    the think block (notes dropped) and 72 the checkable answer."""
    question, solution = text_of(rec, "question"), text_of(rec, "answer")
    final = re.search(r"####\s*(-?[\d,]+(?:\.\d+)?)\s*$", solution)
    if not question or not final:
        return None
    answer, working = final.group(1).replace(",", ""), re.sub(r"<<[^>]*>>", "", solution[:final.start()])
    return {**chat([("user", question), ("assistant", think_reply(working, f"The answer is {answer}."))]),
            "answer": answer}


def from_gsm8k_zh(rec):
    """The Chinese question with its bare answer: the set's working is GSM8K's English one, so no think block."""
    question, answer = text_of(rec, "question_zh-cn"), rec.get("answer_only")
    if not question or answer is None:
        return None
    return {**chat([("user", question), ("assistant", think_reply("", f"答案是 {answer}。"))]), "answer": str(answer)}


def from_pair(rec):
    """A preference pair as its set writes it (records.py reads each format as it is), with only the fields the
    reader needs; None when the reader would refuse it (a reply empty, HH transcripts that do not share a prompt)."""
    pair = {k: rec[k] for k in PAIR_FIELDS if k in rec}
    try:
        fmt = preference_pair(pair)[0]
    except (BadRecord, UserError):
        return None
    return pair if fmt else None


NORMALISERS = {"roneneldan/TinyStories": from_text, "wikimedia/wikipedia": from_text,
               "HuggingFaceFW/fineweb-edu": from_text, "HuggingFaceFW/fineweb-2": from_text,
               "yahma/alpaca-cleaned": from_chat, "shibing624/alpaca-zh": from_chat,
               "llamafactory/alpaca_gpt4_zh": from_chat, "HuggingFaceTB/smol-smoltalk": from_chat,
               "shibing624/sharegpt_gpt4": from_chat, "bespokelabs/Bespoke-Stratos-17k": from_stratos,
               "Congliu/Chinese-DeepSeek-R1-Distill-data-110k": from_reasoning_fields,
               "Anthropic/hh-rlhf": from_pair, "llamafactory/DPO-En-Zh-20k": from_pair,
               "openai/gsm8k": from_gsm8k, "swulling/gsm8k_chinese": from_gsm8k_zh,
               "llamafactory/glaive_toolcall_en": from_tool_chat, "llamafactory/glaive_toolcall_zh": from_tool_chat}


def hub_address():
    """(host, port) of the hub, honouring HF_ENDPOINT (mirrors, e.g. for users in China)."""
    url = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    return url.hostname, url.port or (80 if url.scheme == "http" else 443)


def hub_reachable(timeout: float) -> bool:
    # A plain connect with a timeout: `datasets` itself may retry for minutes before giving up.
    try:
        with socket.create_connection(hub_address(), timeout=timeout):
            return True
    except OSError:
        return False


def stage_limits(cfg: DownloadConfig, stage: str) -> "tuple[int, int]":
    """(records, characters) at which a stage stops; 0 means no limit."""
    if stage == "pretrain":
        return cfg.online_pretrain, int(cfg.pretrain_tokens * CHARS_PER_TOKEN[cfg.lang])
    return {"sft": cfg.online_sft, "r1": cfg.online_r1, "dpo": cfg.online_dpo, "math": cfg.online_math}[stage], 0


def room_kept(sets, max_records: int) -> int:
    """Records a stage of max_records keeps for the whole sets among `sets`: their rows, but at most half the limit, so
    that a small limit still holds the others."""
    return min(sum(s.rows for s in sets if s.whole), max_records // 2)


def records_mb(sets, records: int) -> float:
    """About how many megabytes `records` records of sets take (all of them at most), taken as of one size."""
    rows = sum(s.rows for s in sets)
    return sum(s.mb for s in sets) * min(1.0, records / rows) if rows else 0.0


def stage_mb(cfg: DownloadConfig, stage: str) -> float:
    """About how many megabytes a stage writes."""
    sets = HUB_SETS[cfg.preset][cfg.lang][stage]
    max_records, max_chars = stage_limits(cfg, stage)
    whole = sum(s.mb for s in sets)
    by_chars = max_chars * BYTES_PER_CHAR[cfg.lang] / 1e6 if max_chars else whole
    room = room_kept(sets, max_records)  # the whole sets' records; the others share the rest of the limit
    by_records = records_mb([s for s in sets if s.whole], room) + \
        records_mb([s for s in sets if not s.whole], max_records - room) if max_records else whole
    return min(whole, by_chars, by_records)


def open_stream(hub: HubSet, split: str):
    from datasets import load_dataset  # slow to import; offline runs never need it
    kwargs = {key: value for key, value in (("data_files", hub.data_files), ("data_dir", hub.data_dir)) if value}
    return load_dataset(hub.path, hub.name, split=split, streaming=True, **kwargs)


class StageWriter:
    """Appends one stage's records to NAME.jsonl.partial and commits progress (bytes written, the
    position in the hub stream) to the download state, so a resumed run truncates what was written
    after the last commit and continues from the matching position: no record lost or doubled."""

    def __init__(self, cfg: DownloadConfig, stage: str, state: dict, save_state):
        self.final = os.path.join(cfg.out_dir, f"{stage}.jsonl")
        self.partial = self.final + ".partial"
        self.progress, self.save_state = state["stages"][stage], save_state
        self.file = open(self.partial, "ab")
        self.file.truncate(self.progress["bytes"])
        self.file.seek(self.progress["bytes"])
        self.uncommitted = 0

    def write(self, record: dict, size: int):
        self.file.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
        self.progress["records"] += 1
        self.progress["chars"] += size
        self.uncommitted += 1

    def commit(self, stream=None):
        self.file.flush()
        os.fsync(self.file.fileno())
        self.progress.update(bytes=self.file.tell(), stream_state=stream.state_dict() if stream is not None else None)
        self.save_state()
        self.uncommitted = 0

    def finish(self):
        self.file.close()
        os.replace(self.partial, self.final)
        self.progress["done"] = True
        self.save_state()


def record_size(record: dict) -> int:
    """Characters of text in a record: what the pretraining budget and --online_max_tokens count. A preference
    pair trains as two rows, the prompt with each reply: its size is the longer one's."""
    if "text" in record:
        return len(record["text"])
    rows = [{k: v for k, v in record.items() if k != other} for other in ("chosen", "rejected")] \
        if "chosen" in record else [record]
    return max(len(json.dumps(row, ensure_ascii=False)) for row in rows)


def fetch_stage(cfg: DownloadConfig, stage: str, state: dict, save_state):
    """Stream one stage into out_dir, resuming from the state's last commit."""
    sets = HUB_SETS[cfg.preset][cfg.lang][stage]
    progress = state["stages"].setdefault(stage, {"set": 0, "stream_state": None, "bytes": 0, "records": 0,
                                                  "chars": 0, "val_done": False, "done": False})
    max_records, max_chars = stage_limits(cfg, stage)
    is_chat = stage != "pretrain"
    max_chat_chars = cfg.online_max_tokens * CHARS_PER_TOKEN[cfg.lang]

    def usable(rec, hub):
        record = NORMALISERS[hub.path](rec)
        if record is None:
            return None, 0
        size = record_size(record)
        return (record, size) if not (is_chat and size > max_chat_chars) else (None, 0)

    def full(room=0):  # room: records kept for the sets after this one
        return (max_records and progress["records"] >= max_records - room) or \
            (max_chars and progress["chars"] >= max_chars)

    bar = tqdm(total=max_chars or max_records or sum(s.rows for s in sets), unit=" chars" if max_chars else " records",
               unit_scale=bool(max_chars), desc=f"{stage} <- {' + '.join(s.path for s in sets)}", dynamic_ncols=True,
               initial=progress["chars"] if max_chars else progress["records"])
    writer = StageWriter(cfg, stage, state, save_state)
    try:
        while not full() and progress["set"] < len(sets):
            hub, room = sets[progress["set"]], room_kept(sets[progress["set"] + 1:], max_records)
            if full(room):  # this set's share is written (by it, or by a set before it): on to the next
                progress.update(set=progress["set"] + 1)
                writer.commit()
                continue
            stream = open_stream(hub, hub.split)
            if progress["stream_state"]:
                stream.load_state_dict(progress["stream_state"])
            records = iter(stream)
            if not progress["val_done"]:  # from the first set: its validation split, or its first records
                source = iter(open_stream(hub, hub.val_split)) if hub.val_split else records
                val = []
                for rec in source:
                    record, _ = usable(rec, hub)
                    if record:
                        val.append(record)
                    if len(val) == cfg.n_val:
                        break
                write_jsonl(os.path.join(cfg.out_dir, f"{stage}_val.jsonl"), val)
                progress["val_done"] = True
                writer.commit(None if hub.val_split else stream)
            for rec in records:
                record, size = usable(rec, hub)
                if record:
                    writer.write(record, size)
                    bar.update(size if max_chars else 1)
                if writer.uncommitted >= COMMIT_EVERY or full(room):
                    writer.commit(stream)
                    bar.set_postfix(records=f"{progress['records']:,}", MB=f"{writer.file.tell() / 1e6:,.0f}",
                                    refresh=False)
                if full(room):
                    break
            else:  # this set is used up: on to the next
                progress.update(set=progress["set"] + 1)
                writer.commit()
        if not progress["records"]:
            raise RuntimeError(f"{' + '.join(s.path for s in sets)} gave no usable records")
        if max_chars and progress["chars"] < max_chars:
            tqdm.write(f"note: {stage}: the sets ran out at {progress['chars']:,} of the {max_chars:,} characters "
                       f"asked for; train.py will say how many epochs that makes", file=sys.stderr)
        writer.finish()
    finally:
        writer.file.close()
        bar.close()


def download_online(cfg: DownloadConfig) -> dict:
    """Fetch every stage not fetched yet; returns {name: path} of the ten files."""
    os.makedirs(cfg.out_dir, exist_ok=True)
    state_path = os.path.join(cfg.out_dir, "download_state.json")
    state = {"preset": cfg.preset, "lang": cfg.lang, "stages": {}}
    if os.path.exists(state_path):
        with open(state_path, encoding="utf-8") as f:
            state = json.load(f)
        if (state["preset"], state["lang"]) != (cfg.preset, cfg.lang):
            raise UserError(f"{state_path} belongs to a --preset {state['preset']} --lang {state['lang']} download: "
                            f"run that to finish it, or use another --out_dir")

    def save_state():
        with atomic_write(state_path) as f:
            json.dump(state, f)

    todo = [s for s in STAGES if not stage_complete(cfg, s, state)]
    check_disk(cfg, todo, state)
    for stage in todo:
        if state["stages"].get(stage, {}).get("done"):  # finished once, but its files are gone: fetch anew
            del state["stages"][stage]
        fetch_stage(cfg, stage, state, save_state)
    return {name: os.path.join(cfg.out_dir, f"{name}.jsonl") for stage in STAGES for name in (stage, f"{stage}_val")}


def stage_complete(cfg, stage, state) -> bool:
    done = state["stages"].get(stage, {}).get("done")
    return bool(done) and all(os.path.exists(os.path.join(cfg.out_dir, f"{stage}{s}.jsonl")) for s in ("", "_val"))


def check_disk(cfg: DownloadConfig, stages, state):
    """Print what the fetch needs before its first byte; stop if the disk cannot hold it."""
    need = sum(stage_mb(cfg, s) - state["stages"].get(s, {}).get("bytes", 0) / 1e6 for s in stages) * 1e6
    free = shutil.disk_usage(cfg.out_dir).free
    print(f"fetching about {need / 1e9:.2f} GB into {cfg.out_dir} ({free / 1e9:.1f} GB free)")
    if need > free:
        raise UserError(f"{cfg.out_dir} has {free / 1e9:.1f} GB free but this download needs about "
                        f"{need / 1e9:.1f} GB: free some space or pass --out_dir on a larger disk")


def describe_sets(preset: str, lang: str) -> str:
    return "; ".join(f"{stage} " + " + ".join(s.path + (f" ({s.name or s.data_dir})" if s.name or s.data_dir else "")
                                             for s in sets)
                     for stage, sets in HUB_SETS[preset][lang].items())


def discard_download_state(out_dir: str):
    """After writing the offline set: an online download's leftovers would only confuse a later run (its math
    files too, which the offline set has none of)."""
    online_only = [f"{stage}{suffix}.jsonl" for stage in STAGES for suffix in ("", "_val") if stage not in FILE_NAMES]
    for name in ["download_state.json"] + [f"{stage}.jsonl.partial" for stage in STAGES] + online_only:
        path = os.path.join(out_dir, name)
        if os.path.exists(path):
            os.remove(path)


def print_summary(paths: dict):
    for path in paths.values():
        with open(path, "rb") as f:
            n = sum(1 for _ in f)
        print(f"{path:<36} {n:>10,} records {os.path.getsize(path) / 1e6:>9.2f} MB")


def note(message: str):
    print(f"note: {message}", file=sys.stderr)


def hub_unusable(cfg: DownloadConfig) -> Optional[str]:
    """Why the hub cannot be used, or None when it can."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "") or \
            os.environ.get("HF_DATASETS_OFFLINE", "0") not in ("0", ""):
        return "HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set"
    if not hub_reachable(cfg.connect_timeout):
        return f"{hub_address()[0]} is unreachable"
    return None


def download(cfg: DownloadConfig):
    if cfg.lang not in GENERATORS:
        raise UserError(f"--lang must be one of {', '.join(GENERATORS)}, got {cfg.lang!r}")
    if min(cfg.n_sft, cfg.n_r1, cfg.n_dpo, cfg.n_val) < 1 or cfg.pretrain_mb <= 0 or \
            min(cfg.online_pretrain, cfg.online_sft, cfg.online_r1, cfg.online_dpo, cfg.online_math,
                cfg.pretrain_tokens) < 0:
        raise UserError("record counts and --pretrain_mb must be positive (online limits: 0 or more)")
    unusable = "--offline true was given" if cfg.offline else hub_unusable(cfg)
    if cfg.preset != "cpu" and unusable:
        total = sum(stage_mb(cfg, stage) for stage in STAGES) / 1e3
        raise UserError(f"--preset {cfg.preset} streams about {total:.0f} GB from the Hugging Face hub "
                        f"({describe_sets(cfg.preset, cfg.lang)}), but {unusable}; the built-in offline data is "
                        f"only the cpu preset's (--preset cpu --offline true)")
    paths = None
    if unusable and not cfg.offline:
        note(f"{unusable}, writing the built-in offline data instead")
    elif not unusable:
        try:
            paths = download_online(cfg)
        except (UserError, KeyboardInterrupt) as e:
            if isinstance(e, KeyboardInterrupt):
                print("\ninterrupted: run the same command again to continue where it stopped", file=sys.stderr)
            raise
        except Exception as e:  # any failure of the hub or of `datasets` (a full disk shows here too)
            reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            failure = f"streaming from {hub_address()[0]} failed ({type(e).__name__}: {reason})"
            if cfg.preset != "cpu":
                raise UserError(f"{failure}; run the same command again to continue where it stopped") from None
            note(f"{failure}, writing the built-in offline data instead")
    if paths is None:
        try:
            paths = write_offline_data(cfg.out_dir, cfg.lang, cfg.seed, cfg.pretrain_mb, cfg.n_sft, cfg.n_r1,
                                       n_dpo=cfg.n_dpo, n_val=cfg.n_val)
        except OSError as e:
            raise UserError(f"cannot write to {cfg.out_dir}: {e.strerror or e}") from None
        discard_download_state(cfg.out_dir)
    print_summary(paths)


def main(argv=None):
    sources = " ".join(f"[{preset} {lang}] {describe_sets(preset, lang)}."
                       for preset in HUB_SETS for lang in HUB_SETS[preset])
    run_guarded(download, parse_config(
        DownloadConfig, argv, presets=PRESETS, description=f"Write pretrain / sft / r1 / dpo (/ math online) jsonl "
        f"data for a preset. Online sources: {sources} Offline (--offline true, or when the hub cannot be reached "
        f"with the cpu preset): a built-in generator of stories, chats, checkable reasoning problems and preference "
        f"pairs of their right and wrong answers."))


if __name__ == "__main__":
    main()
