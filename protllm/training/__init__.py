"""Training: recipes, the stages of STELLA and SEPIT, their trainers, the collator and the feature cache."""
