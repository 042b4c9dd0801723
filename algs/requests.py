"""Edit requests in every form users write them, turned into the framework's one form.

The framework's request: {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux",
"target_new": {"str": "English"}, optional "target_true": {"str": "French"}, optional "case_id"}.
Also accepted: a dataset record that holds one under "requested_rewrite" (CounterFact, zsRE, KnowEdit),
plain-string targets, and EasyEdit's form: filled prompts ("The mother tongue of Danielle Darrieux is") with
the subject given separately, which is located in the prompt (absent or more than once: an InputError).
"""
from util.checks import check_requests
from util.errors import InputError


def request_of(record: dict) -> dict:
    """The edit request of a dataset record (its requested_rewrite, with its case_id), or a request as it is."""
    if "requested_rewrite" in record:
        return {"case_id": record["case_id"], **record["requested_rewrite"]}
    return dict(record)


def requests_of(record: dict) -> list[dict]:
    """Every edit request of a dataset record: one, or all of an MQuAKE case's requested_rewrite list (they go
    into one batch), each with the record's case_id."""
    rewrites = record.get("requested_rewrite")
    if isinstance(rewrites, list):
        return [{"case_id": record["case_id"], **rewrite} for rewrite in rewrites]
    return [request_of(record)]


def subject_template(prompt: str, subject: str, where: str) -> str:
    """A filled prompt turned into a template: its one occurrence of `subject` replaced by "{}"."""
    if not isinstance(prompt, str) or not isinstance(subject, str) or not subject.strip():
        raise InputError(f"prompt {prompt!r} with subject {subject!r}", where,
                         "give the prompt and its non-empty subject as strings")
    if "{}" in prompt:
        return prompt
    count = prompt.count(subject)
    if count == 0:
        raise InputError(f"the subject {subject!r} is not in the prompt {prompt!r}", where,
                         "give the subject exactly as it is written in the prompt")
    if count > 1:
        raise InputError(f"the subject {subject!r} occurs {count} times in the prompt {prompt!r}", where,
                         "give the prompt as a template with '{}' where the edited subject is")
    return prompt.replace(subject, "{}")


def _as_target(value):
    return {"str": value} if isinstance(value, str) else value


def normalise(request: dict, where: str) -> dict:
    """One request in the framework's form (a template prompt, {"str": ...} targets)."""
    if not isinstance(request, dict):
        return request  # check_requests names the problem
    request = request_of(request)
    if "prompt" in request and "subject" in request:
        request["prompt"] = subject_template(request["prompt"], request["subject"], where)
    for key in ("target_new", "target_true"):
        if key in request:
            request[key] = _as_target(request[key])
    return request


def as_requests(requests=None, *, prompts=None, target_new=None, subject=None, ground_truth=None,
                where: str = "edit") -> list[dict]:
    """The requests of an `Editor.edit` call: a list of requests/records, or EasyEdit's parallel lists."""
    if requests is not None and prompts is not None:
        raise InputError("both requests and prompts were given", where, "give one of them")
    if requests is None:
        requests = _from_lists(prompts, target_new, subject, ground_truth, where)
    elif isinstance(requests, dict):
        requests = [requests]
    if isinstance(requests, (list, tuple)):
        requests = [normalise(request, f"{where} request {i}") for i, request in enumerate(requests)]
    check_requests(requests, where)
    return requests


def _from_lists(prompts, target_new, subject, ground_truth, where: str) -> list[dict]:
    """EasyEdit's `edit(prompts=[...], target_new=[...], subject=[...], ground_truth=[...])`."""
    if prompts is None:
        raise InputError("no requests", where, "give requests, or prompts= with target_new= and subject=")
    lists = {"prompts": prompts, "target_new": target_new, "subject": subject}
    if ground_truth is not None:
        lists["ground_truth"] = ground_truth
    lists = {name: [value] if isinstance(value, str) else value for name, value in lists.items()}
    missing = [name for name, value in lists.items() if value is None]
    if missing:
        raise InputError(f"{', '.join(missing)} missing", where,
                         "give prompts=, target_new= and subject= as lists of the same length")
    lengths = {name: len(value) for name, value in lists.items()}
    if len(set(lengths.values())) != 1:
        raise InputError(f"lists of different lengths {lengths}", where, "give one entry per prompt in each list")
    requests = []
    for i, prompt in enumerate(lists["prompts"]):
        request = {"prompt": prompt, "subject": lists["subject"][i], "target_new": lists["target_new"][i]}
        if "ground_truth" in lists and lists["ground_truth"][i] is not None:
            request["target_true"] = lists["ground_truth"][i]
        requests.append(request)
    return requests
