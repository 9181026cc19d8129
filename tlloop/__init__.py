"""tlloop: a custom training loop for transfer learning and fine-tuning with TensorFlow 2.

Importing tlloop.models registers tlloop's Keras classes, so exported `.keras` files load with
`keras.saving.load_model` after `import tlloop.models`.
"""

__version__ = "0.1.0"
