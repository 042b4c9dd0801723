"""ROME's "known facts" (known_1000.json): prompts GPT-2 XL completes correctly, used for causal tracing."""
from collections.abc import Sequence

from dsets.download import REMOTE_DSETS, locate, read_json_list

KNOWNS_FILE = "known_1000.json"
KNOWN_KEYS = ("known_id", "subject", "attribute", "template", "prompt", "relation_id")


class KnownsDataset(Sequence):
    """Records {known_id, subject, attribute, template ("{}" = subject), prediction, prompt, relation_id}."""

    def __init__(self, data_dir=None):
        self.path = locate(KNOWNS_FILE, data_dir, f"{REMOTE_DSETS}/{KNOWNS_FILE}")
        self.records = read_json_list(self.path)
        for i, record in enumerate(self.records):
            missing = [k for k in KNOWN_KEYS if not isinstance(record, dict) or k not in record]
            if missing:
                raise ValueError(f"{self.path} record {i}: missing {missing} (expected ROME's known_1000.json)")

    def __len__(self):
        return len(self.records)

    def __getitem__(self, item):
        return self.records[item]
