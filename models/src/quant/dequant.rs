//! Block dequantization for every supported ggml type.

use half::bf16;

use crate::gguf::GgmlType;

use super::f16_at;

/// Dequantizes `bytes` (whole blocks of type `ty`) into `out`.
///
/// Returns `None` if the type is unknown or `bytes` and `out` do not describe
/// the same number of whole blocks.
pub fn dequantize(ty: GgmlType, bytes: &[u8], out: &mut [f32]) -> Option<()> {
    let (block, size) = ty.block_layout()?;
    if !bytes.len().is_multiple_of(size) || out.len() != bytes.len() / size * block {
        return None;
    }
    for (src, dst) in bytes.chunks_exact(size).zip(out.chunks_exact_mut(block)) {
        dequantize_block(ty, src, dst);
    }
    Some(())
}

/// Dequantizes one row of `cols` values starting at block-aligned element `start`.
pub fn dequantize_row(ty: GgmlType, bytes: &[u8], start: usize, out: &mut [f32]) -> Option<()> {
    let (block, size) = ty.block_layout()?;
    if !start.is_multiple_of(block) || !out.len().is_multiple_of(block) {
        return None;
    }
    let first = start / block * size;
    let len = out.len() / block * size;
    dequantize(ty, bytes.get(first..first + len)?, out)
}

fn dequantize_block(ty: GgmlType, b: &[u8], y: &mut [f32]) {
    match ty {
        GgmlType::F32 => y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        GgmlType::F16 => y[0] = f16_at(b, 0),
        GgmlType::BF16 => y[0] = bf16::from_le_bytes([b[0], b[1]]).to_f32(),
        GgmlType::Q4_0 => {
            let d = f16_at(b, 0);
            let qs = &b[2..18];
            for j in 0..16 {
                y[j] = ((qs[j] & 0x0F) as i32 - 8) as f32 * d;
                y[j + 16] = ((qs[j] >> 4) as i32 - 8) as f32 * d;
            }
        }
        GgmlType::Q4_1 => {
            let (d, m) = (f16_at(b, 0), f16_at(b, 2));
            let qs = &b[4..20];
            for j in 0..16 {
                y[j] = (qs[j] & 0x0F) as f32 * d + m;
                y[j + 16] = (qs[j] >> 4) as f32 * d + m;
            }
        }
        GgmlType::Q5_0 => {
            let d = f16_at(b, 0);
            let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
            let qs = &b[6..22];
            for j in 0..16 {
                let h0 = ((qh >> j) << 4) & 0x10;
                let h1 = (qh >> (j + 12)) & 0x10;
                y[j] = (((qs[j] & 0x0F) as u32 | h0) as i32 - 16) as f32 * d;
                y[j + 16] = (((qs[j] >> 4) as u32 | h1) as i32 - 16) as f32 * d;
            }
        }
        GgmlType::Q5_1 => {
            let (d, m) = (f16_at(b, 0), f16_at(b, 2));
            let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
            let qs = &b[8..24];
            for j in 0..16 {
                let h0 = ((qh >> j) << 4) & 0x10;
                let h1 = (qh >> (j + 12)) & 0x10;
                y[j] = ((qs[j] & 0x0F) as u32 | h0) as f32 * d + m;
                y[j + 16] = ((qs[j] >> 4) as u32 | h1) as f32 * d + m;
            }
        }
        GgmlType::Q8_0 => {
            let d = f16_at(b, 0);
            for j in 0..32 {
                y[j] = (b[2 + j] as i8) as f32 * d;
            }
        }
        GgmlType::Q4K => {
            let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
            let scales = &b[4..16];
            let qs = &b[16..144];
            for (chunk, pair) in (0..4).zip(y.chunks_exact_mut(64)) {
                let (sc1, m1) = scale_min_k4(2 * chunk, scales);
                let (sc2, m2) = scale_min_k4(2 * chunk + 1, scales);
                let (d1, m1) = (d * sc1 as f32, dmin * m1 as f32);
                let (d2, m2) = (d * sc2 as f32, dmin * m2 as f32);
                let q = &qs[32 * chunk..32 * chunk + 32];
                for l in 0..32 {
                    pair[l] = d1 * (q[l] & 0x0F) as f32 - m1;
                    pair[l + 32] = d2 * (q[l] >> 4) as f32 - m2;
                }
            }
        }
        GgmlType::Q5K => {
            let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
            let scales = &b[4..16];
            let qh = &b[16..48];
            let qs = &b[48..176];
            for (chunk, pair) in (0..4).zip(y.chunks_exact_mut(64)) {
                let (sc1, m1) = scale_min_k4(2 * chunk, scales);
                let (sc2, m2) = scale_min_k4(2 * chunk + 1, scales);
                let (d1, m1) = (d * sc1 as f32, dmin * m1 as f32);
                let (d2, m2) = (d * sc2 as f32, dmin * m2 as f32);
                let (u1, u2) = (1u8 << (2 * chunk), 2u8 << (2 * chunk));
                let q = &qs[32 * chunk..32 * chunk + 32];
                for l in 0..32 {
                    let h1 = if qh[l] & u1 != 0 { 16 } else { 0 };
                    let h2 = if qh[l] & u2 != 0 { 16 } else { 0 };
                    pair[l] = d1 * ((q[l] & 0x0F) + h1) as f32 - m1;
                    pair[l + 32] = d2 * ((q[l] >> 4) + h2) as f32 - m2;
                }
            }
        }
        GgmlType::Q6K => {
            let ql = &b[0..128];
            let qh = &b[128..192];
            let sc = &b[192..208];
            let d = f16_at(b, 208);
            for (half_block, out) in (0..2).zip(y.chunks_exact_mut(128)) {
                let ql = &ql[64 * half_block..];
                let qh = &qh[32 * half_block..];
                let sc = &sc[8 * half_block..];
                for l in 0..32 {
                    let is = l / 16;
                    let q1 = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) as i32 - 32;
                    let q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                    let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                    let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                    out[l] = d * (sc[is] as i8) as f32 * q1 as f32;
                    out[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
                    out[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
                    out[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
                }
            }
        }
        GgmlType::Other(_) => unreachable!("block_layout() rejected unknown types"),
    }
}

/// The 6-bit scale and min of sub-block `j` of a Q4_K/Q5_K block.
pub(super) fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

#[cfg(test)]
mod tests {
    use half::f16;

    use super::*;

    fn f16b(v: f32) -> [u8; 2] {
        f16::from_f32(v).to_le_bytes()
    }

    #[test]
    fn q4_0_golden_block() {
        // d = 0.5, nibbles: low = j % 16, high = 15 - j % 16.
        let mut b = f16b(0.5).to_vec();
        b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let mut y = [0f32; 32];
        dequantize(GgmlType::Q4_0, &b, &mut y).unwrap();
        for j in 0..16 {
            assert_eq!(y[j], (j as f32 - 8.0) * 0.5);
            assert_eq!(y[j + 16], (7.0 - j as f32) * 0.5);
        }
    }

    #[test]
    fn q4_1_and_q8_0_golden_blocks() {
        let mut b = f16b(0.25).to_vec();
        b.extend(f16b(-1.0));
        b.extend([0x21u8; 16]);
        let mut y = [0f32; 32];
        dequantize(GgmlType::Q4_1, &b, &mut y).unwrap();
        assert_eq!(y[0], 1.0 * 0.25 - 1.0);
        assert_eq!(y[16], 2.0 * 0.25 - 1.0);

        let mut b = f16b(2.0).to_vec();
        b.extend((0..32).map(|j| (j as i8 - 16) as u8));
        dequantize(GgmlType::Q8_0, &b, &mut y).unwrap();
        for (j, v) in y.iter().enumerate() {
            assert_eq!(*v, (j as f32 - 16.0) * 2.0);
        }
    }

    #[test]
    fn q5_0_uses_the_fifth_bit() {
        // All nibbles 0xF; qh sets the high bit of element 0 (low half) and element 16 (bit 12+0... high half).
        let mut b = f16b(1.0).to_vec();
        b.extend((1u32 | (1 << 16)).to_le_bytes());
        b.extend([0xFFu8; 16]);
        let mut y = [0f32; 32];
        dequantize(GgmlType::Q5_0, &b, &mut y).unwrap();
        assert_eq!(y[0], 31.0 - 16.0);
        assert_eq!(y[1], 15.0 - 16.0);
        assert_eq!(y[16], 31.0 - 16.0);
        assert_eq!(y[17], 15.0 - 16.0);
    }

    #[test]
    fn q4_k_golden_block() {
        // d = 1, dmin = 0.5; sub-block scales 1..8 and mins 8..1 packed as ggml packs them.
        let sc: [u8; 8] = [1, 2, 3, 4, 5, 6, 7, 8];
        let mn: [u8; 8] = [8, 7, 6, 5, 4, 3, 2, 1];
        let mut scales = [0u8; 12];
        scales[..4].copy_from_slice(&sc[..4]);
        scales[4..8].copy_from_slice(&mn[..4]);
        for j in 4..8 {
            scales[j + 4] = (sc[j] & 0x0F) | ((mn[j] & 0x0F) << 4);
            scales[j - 4] |= (sc[j] >> 4) << 6;
            scales[j] |= (mn[j] >> 4) << 6;
        }
        let mut b = f16b(1.0).to_vec();
        b.extend(f16b(0.5));
        b.extend(scales);
        b.extend([0x53u8; 128]); // low nibble 3, high nibble 5
        let mut y = [0f32; 256];
        dequantize(GgmlType::Q4K, &b, &mut y).unwrap();
        for sub in 0..8 {
            let q = if sub % 2 == 0 { 3.0 } else { 5.0 };
            let expected = sc[sub] as f32 * q - 0.5 * mn[sub] as f32;
            assert!(
                y[sub * 32..sub * 32 + 32].iter().all(|&v| v == expected),
                "sub-block {sub}"
            );
        }
    }

    #[test]
    fn q6_k_golden_block() {
        // ql nibbles 0xA, qh bits 0b10 per element -> q = 0xA | (2 << 4) = 42 -> 42 - 32 = 10.
        let mut b = vec![0xAAu8; 128];
        b.extend([0b1010_1010u8; 64]);
        b.extend((1..=16).map(|s: i8| s as u8));
        b.extend(f16b(0.5));
        let mut y = [0f32; 256];
        dequantize(GgmlType::Q6K, &b, &mut y).unwrap();
        for (i, v) in y.iter().enumerate() {
            let scale = (i / 16 + 1) as f32;
            assert_eq!(*v, 0.5 * scale * 10.0, "element {i}");
        }
    }

    #[test]
    fn rejects_partial_blocks() {
        let mut y = [0f32; 32];
        assert!(dequantize(GgmlType::Q4_0, &[0u8; 17], &mut y).is_none());
        assert!(dequantize(GgmlType::Other(99), &[0u8; 18], &mut y).is_none());
        assert!(dequantize_row(GgmlType::Q4_0, &[0u8; 36], 16, &mut y).is_none());
    }
}
