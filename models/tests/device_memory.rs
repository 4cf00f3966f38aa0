//! What a model holds on its device. Alone in its test binary: the device's
//! allocator counts every model in the process, so no other test may load
//! one beside it.

mod common;

use std::sync::Arc;

use realm_models::arch::{ComputeDevice, Model};
use realm_models::gguf::GgufFile;

/// On a GPU the weights stay quantized: the device holds about the file's
/// bytes plus the KV cache, not the 4× of dense f32 weights. On the CPU
/// nothing is on a device.
#[test]
fn device_memory_is_about_the_file_size() {
    for (name, _) in common::MODELS {
        let Some(path) = common::model(name) else {
            continue;
        };
        let file_bytes = std::fs::metadata(&path).unwrap().len();
        let model =
            Model::load(Arc::new(GgufFile::open(&path).unwrap()), common::device()).unwrap();
        if common::device() != ComputeDevice::Gpu {
            assert_eq!(model.device_bytes(), 0);
            assert_eq!(model.device_memory(), None);
            continue;
        }
        let c = model.config();
        let capacity = 256;
        let mut seq = model.new_sequence(capacity);
        model.forward(&mut seq, &[1, 2, 3, 4]).unwrap();
        // Keys and values, f16 on a GPU, every layer, the capacity allocated.
        let kv = (2 * c.n_layer * c.n_head_kv * c.head_dim * capacity * 2) as u64;
        let used = model.device_memory().expect("a GPU reports its memory");
        eprintln!(
            "{name}: file {} MiB, weights on the device {} MiB, allocator in use {} MiB \
             (reserved {} MiB), KV cache {} MiB",
            file_bytes >> 20,
            model.device_bytes() >> 20,
            used.in_use >> 20,
            used.reserved >> 20,
            kv >> 20
        );
        assert!(model.device_bytes() <= file_bytes * 13 / 10);
        assert!(
            used.in_use <= file_bytes * 13 / 10 + kv,
            "{name}: {} bytes in use for a {file_bytes}-byte file and {kv} of cache",
            used.in_use
        );
        drop(seq);
    }
}
