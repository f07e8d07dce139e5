"""The app through the official openai client, whole and streamed (greedy, so both give the same text)."""

import os

import openai

client = openai.OpenAI(base_url=os.environ.get("OPENAI_BASE_URL", "http://127.0.0.1:8000/v1"),
                       api_key=os.environ.get("OPENAI_API_KEY", "sk-local"))
messages = [{"role": "user", "content": "Name a river."}]
whole = client.chat.completions.create(model="my-model", messages=messages, max_tokens=16, temperature=0.0)
print("whole:", whole.choices[0].message.content)
stream = client.chat.completions.create(model="my-model", messages=messages, max_tokens=16, temperature=0.0,
                                        stream=True)
print("stream:", "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices))
