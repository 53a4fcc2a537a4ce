"""Chat with a tuned model beside its reference: in the terminal (`preftune chat`, `--compare`) or in a
web page (`preftune chat --ui`), with votes saved as new preference pairs.

engine  one model in memory answering as the tuned model or its reference, streamed
votes   "which reply is better" votes -> preference pairs in a JSONL file `preftune dpo` reads
ui      the Gradio page: two streamed panes side by side, settings, votes
"""
