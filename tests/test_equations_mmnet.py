

def test_eq5_coordinates_follow_the_feature_maps_device_and_dtype():
    """F_coord is made on F_m's device and in its dtype: a float64 or meta-device neck runs."""
    neck = mmnet.FusionNeck(C, text_dim=6).eval()
    f_v2, f_v3, f_v4 = neck_inputs()
    with torch.no_grad():
        out = neck.double()(f_v2.double(), f_v3.double(), f_v4.double(), torch.randn(2, 6).double())
        assert out.dtype == torch.float64
        neck = neck.float().to("meta")
        meta = [x.to("meta") for x in (f_v2, f_v3, f_v4, torch.randn(2, 6))]
        assert neck(*meta).device.type == "meta"
