#!/usr/bin/env python
"""Fine-tune Stable Diffusion 1.x / 2.x on captioned images with SaRA sparse deltas.

The data is a local folder: images plus a `metadata.jsonl` (one JSON object per line, e.g.
{"file_name": "0001.png", "text": "a photo of ..."}) or, without it, one caption file per image
(`0001.png` + `0001.txt`). Usage:

    accelerate launch integrations/diffusers/train_text_to_image_sara.py \\
      --pretrained_model_name_or_path ./stable-diffusion-v1-5 --train_data_dir ./my-images \\
      --resolution 512 --random_flip --train_batch_size 4 --max_train_steps 5000 \\
      --learning_rate 5e-4 --lr_scheduler cosine --mixed_precision fp16 --use_8bit_adam \\
      --sara_threshold 2e-3 --sara_progressive_iter 0.5 --checkpointing_steps 500 \\
      --validation_prompt "a photo of ..." --output_dir sara-out

The result is `<output_dir>/sara_weights.safetensors` (native SaRA format, the same as kohya's
`--network_module sara_network` writes); load it with `sara_network.hf.load_sara(pipe, path)`.
See docs/diffusers.md.
"""
import argparse
import random

import torch

from sara_diffusers_common import (add_training_args, check_args, load_models, make_accelerator, prepare_image,
                                   read_captioned_folder, tokenize, train)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Text-to-image fine-tuning of Stable Diffusion with SaRA.")
    data = parser.add_argument_group("captioned images")
    data.add_argument("--train_data_dir", type=str, required=True,
                      help="Folder with images and metadata.jsonl, or images with same-name caption files.")
    data.add_argument("--image_column", type=str, default="file_name", help="metadata.jsonl field of the image file.")
    data.add_argument("--caption_column", type=str, default="text", help="metadata.jsonl field of the caption.")
    data.add_argument("--caption_extension", type=str, default=".txt", help="Caption files next to the images.")
    data.add_argument("--max_train_samples", type=int, default=None, help="Use only the first N images.")
    add_training_args(parser)
    args = parser.parse_args(argv)
    check_args(parser, args)
    return args


class CaptionedImages(torch.utils.data.Dataset):
    """Images with their captions; items are requested as (index, seed) by SeededEpochSampler."""

    def __init__(self, pairs, tokenizer, args):
        self.pairs, self.tokenizer, self.args = pairs, tokenizer, args

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, item):
        index, seed = item
        path, caption = self.pairs[index]
        rng = random.Random(seed)
        pixels = prepare_image(path, self.args.resolution, self.args.center_crop, self.args.random_flip, rng)
        return {"pixel_values": pixels, "input_ids": tokenize(self.tokenizer, [caption])[0]}


def collate(examples):
    return {"pixel_values": torch.stack([e["pixel_values"] for e in examples]),
            "input_ids": torch.stack([e["input_ids"] for e in examples])}


def main(argv=None):
    args = parse_args(argv)
    accelerator = make_accelerator(args)
    models = load_models(args)
    pairs = read_captioned_folder(args.train_data_dir, args.image_column, args.caption_column, args.caption_extension)
    if args.max_train_samples is not None:
        pairs = pairs[: args.max_train_samples]
    dataset = CaptionedImages(pairs, models.tokenizer, args)
    train(args, accelerator, models, dataset, collate, extra_metadata={"ss_num_train_images": str(len(dataset))})


if __name__ == "__main__":
    main()
