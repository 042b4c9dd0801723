"""Per-case metrics: counterfact (NLL scores, ES/PS/NS), zsre (token accuracy), generation (GE, RS)."""
