#!/usr/bin/env bash
# The learning rate and warm-up of fine-tuning from pre-trained weights, measured on data the study never uses.
set -x
cd /work/main
OUT=/tmp/lr
python -c "
from hybridmim_components.phantoms import write_ct_phantoms
write_ct_phantoms('$OUT/pretrain_data', num_subjects=12, seed=2000)
write_ct_phantoms('$OUT/spleen_data', num_subjects=12, seed=3000, task='spleen')"
python -m monai.bundle run training --config_file bundles/hybridmim_unet_pretrain/configs/train.json \
    --bundle_root $OUT/pretrain --dataset_dir $OUT/pretrain_data > $OUT/pretrain.log 2>&1
for lr in 0.001 0.0003; do for warm in 0 3; do
  python -m monai.bundle run training --config_file bundles/msd_spleen_segmentation/configs/train.json \
      --bundle_root $OUT/ft_${lr}_${warm} --dataset_dir $OUT/spleen_data --seed 5 --label_fraction 0.5 \
      --pretrained $OUT/pretrain/models/model.pt --pretrained_learning_rate $lr --pretrained_warmup_epochs $warm \
      --val_interval 2 > $OUT/ft_${lr}_${warm}.log 2>&1
done; done
echo done > $OUT/DONE
