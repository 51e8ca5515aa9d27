"""From a client's OpenAI request to a backend request and back."""
