"""The commands' recipes, each read top to bottom: `train_crm`, `train_llm`, `distill`. Only the CLI imports them."""
