"""Records exactly as the tunix-rt backend writes them (json.dumps with its defaults), shared by tests."""

# One trace, exported as `trace` and as `tunix_sft` (M09).
TRACE_LINE = (
    '{"id": "5f0c6d1e-2b43-4c1e-9a57-3f1d2c8b9e10", "prompts": "What is 15 + 27?", '
    '"trace_steps": ["Add the ones: 5 + 7 = 12", "Add the tens: 10 + 20 + 10 = 40"], "final_answer": "42", '
    '"metadata": {"created_at": "2025-11-20T10:00:00+00:00", "trace_version": "1.0"}}'
)
TUNIX_SFT_LINE = (
    '{"id": "5f0c6d1e-2b43-4c1e-9a57-3f1d2c8b9e10", "prompts": "<start_of_turn>user\\nWhat is 15 + 27?'
    "<end_of_turn>\\n<start_of_turn>model\\nReasoning:\\n1. Add the ones: 5 + 7 = 12\\n"
    '2. Add the tens: 10 + 20 + 10 = 40\\nAnswer: 42<end_of_turn>", "final_answer": "42", '
    '"metadata": {"created_at": "2025-11-20T10:00:00+00:00", "trace_version": "1.0", "format": "tunix_sft"}}'
)

# A raw ReasoningTrace from the UNGAR card-game engine.
UNGAR_TRACE = {
    "trace_version": "1.0",
    "prompt": "High Card Duel: You have 1 hidden card. Action: reveal.",
    "final_answer": "reveal",
    "steps": [
        {"i": 0, "type": "legal_moves", "content": "Legal moves: [reveal]"},
        {"i": 1, "type": "observation", "content": "My hand: AS"},
        {"i": 2, "type": "unseen", "content": "Unseen cards: 51"},
        {"i": 3, "type": "decision", "content": "Action chosen: reveal"},
    ],
    "meta": {"source": "ungar", "game": "high_card_duel", "episode_index": 0, "my_card": "AS",
             "opponent_card": "KH", "result": "win", "seed": 42},
}
