"""Programs that talk to a served model: client, chat, smoke, bench, OpenAI-compatible proxy."""
