"""The exact allow-list of what a saved ``.fxp`` model may refer to.

:func:`fxprune.serialization.load` rebuilds a graph from names stored in a file that may have been
crafted. Every name is looked up here, in literal lists, and nowhere else: a call target, a method
name, an attribute read with ``getattr``, a module class, a type annotation and a pytree output
type. There is no module-prefix rule, and a name the tables do not hold is refused without any
import: names in ``torch``, ``torch.nn.functional``, ``operator``, ``math``, ``builtins`` and
``fxprune.ops`` are read from those (already imported) modules; the few torchvision and timm
entries name their module in the table, and only that fixed module is imported. The one import a
file can steer: a pytree output type of a Hugging Face model registers itself when its module is
imported, so ``transformers.modeling_outputs`` and modules named exactly
``transformers.models.<name>.modeling_<name>`` are imported for it (:func:`spec_type_module`).

The lists cover the graphs fxprune itself produces (``tools/collect_graph_targets.py`` walks the
torchvision, timm and Hugging Face captures and prunes and reports any name missing here) and the
tensor maths around them. Left out on purpose: anything that reads or writes files, imports,
compiles or runs code (``torch.load``/``save``, ``torch.hub``, ``torch.compile``, ``eval``), calls a
Python callable it is given (``operator.methodcaller``, ``Tensor.apply_``), reaches attributes by
a computed name (``operator.attrgetter``), touches raw memory (``set_``, ``as_strided``,
``_unsafe_index``, ``from_file``, ``untyped_storage``), or imports through a type name
(``Tensor.type("pkg.Type")``).
"""

from __future__ import annotations

import builtins
import importlib
import math
import operator
import re
import sys
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "ATEN_OPS", "TORCH_FUNCTIONS", "FUNCTIONAL", "OPERATOR", "MATH", "BUILTINS", "FXPRUNE_OPS",
    "LIBRARY_FUNCTIONS", "LIBRARY_CLASSES", "NN_MODULE_CLASSES", "TENSOR_METHODS", "GETATTR_NAMES",
    "TYPE_NAMES", "lookup_callable", "allowed_op", "lookup_module_class", "lookup_type", "lookup_enum",
    "allowed_spec_type", "spec_type_module",
]


def _names(text: str) -> frozenset[str]:
    return frozenset(text.split())


#: ``torch.ops.aten`` operators (every overload of each). Tensor maths, shapes, nn ops, factories.
ATEN_OPS = _names("""
    Bool Complex ComplexImplicit Delete Float FloatImplicit Generator Int IntImplicit ScalarImplicit
    Size _adaptive_avg_pool2d _adaptive_avg_pool3d _addmm_activation _aminmax _assert_async
    _assert_scalar _assert_tensor_metadata _autocast_to_full_precision
    _autocast_to_reduced_precision _batch_norm_impl_index _cast_Byte _cast_Double _cast_Float
    _cast_Half _cast_Int _cast_Long _cdist_forward _conj _conj_physical _convolution _dim_arange
    _embedding_bag _euclidean_dist _fft_c2c _fft_c2r _fft_r2c _functional_assert_async
    _functional_assert_scalar _local_scalar_dense _log_softmax _make_dep_token _masked_softmax
    _native_batch_norm_legit _native_batch_norm_legit_functional
    _native_batch_norm_legit_no_training _native_multi_head_attention _neg_view _neg_view_copy
    _pack_padded_sequence _pad_circular _pad_enum _pad_packed_sequence _pdist_forward _prelu_kernel
    _reshape_alias _reshape_from_tensor _safe_softmax _scaled_dot_product_cudnn_attention
    _scaled_dot_product_efficient_attention _scaled_dot_product_flash_attention
    _scaled_dot_product_flash_attention_for_cpu _shape_as_tensor _softmax _to_copy _trilinear
    _unique _unique2 _unsafe_view _upsample_bicubic2d_aa _upsample_bilinear2d_aa
    _upsample_nearest_exact1d _upsample_nearest_exact2d _upsample_nearest_exact3d _weight_norm
    _weight_norm_interface abs abs_ absolute absolute_ acos acos_ acosh acosh_ adaptive_avg_pool1d
    adaptive_avg_pool2d adaptive_avg_pool3d adaptive_max_pool1d adaptive_max_pool2d
    adaptive_max_pool3d add add_ addbmm addbmm_ addcdiv addcdiv_ addcmul addcmul_ addmm addmm_ addmv
    addmv_ addr addr_ adjoint affine_grid_generator alias alias_copy all allclose alpha_dropout
    alpha_dropout_ amax amin aminmax angle any append arange arccos arccos_ arccosh arccosh_ arcsin
    arcsin_ arcsinh arcsinh_ arctan arctan2 arctan2_ arctan_ arctanh arctanh_ argmax argmin argsort
    argwhere as_tensor asin asin_ asinh asinh_ atan atan2 atan2_ atan_ atanh atanh_ atleast_1d
    atleast_2d atleast_3d avg_pool1d avg_pool2d avg_pool3d baddbmm baddbmm_ bartlett_window
    batch_norm bernoulli bernoulli_ bilinear bin binary_cross_entropy
    binary_cross_entropy_with_logits bincount binomial bitwise_and bitwise_and_ bitwise_left_shift
    bitwise_left_shift_ bitwise_not bitwise_not_ bitwise_or bitwise_or_ bitwise_right_shift
    bitwise_right_shift_ bitwise_xor bitwise_xor_ blackman_window block_diag bmm broadcast_shapes
    broadcast_tensors broadcast_to bucketize capitalize cartesian_prod cat cauchy cauchy_ cdist ceil
    ceil_ celu celu_ center chain_matmul chalf channel_shuffle cholesky_inverse cholesky_solve chr
    chunk clamp clamp_ clamp_max clamp_max_ clamp_min clamp_min_ clear clip clip_ clone col2im
    column_stack combinations complex concat concatenate confirmed_by_owner conj conj_physical
    conj_physical_ constant_pad_nd contiguous conv1d conv2d conv3d conv_depthwise3d conv_tbc
    conv_transpose1d conv_transpose2d conv_transpose3d convolution convolution_overrideable copy
    copy_ copysign copysign_ corrcoef cos cos_ cosh cosh_ cosine_embedding_loss cosine_similarity
    count count_nonzero cov cpu cross cross_entropy_loss ctc_loss cuda cummax cummin cumprod
    cumprod_ cumsum cumsum_ cumulative_trapezoid deg2rad deg2rad_ degrees dense_dim det detach
    detach_ detach_copy device diag diag_embed diagflat diagonal diagonal_copy diagonal_scatter dict
    diff digamma digamma_ dim dist div div_ divide divide_ divmod dot dropout dropout_ dsplit dstack
    einsum element_size elu elu_ embedding embedding_bag embedding_renorm embedding_renorm_ empty
    empty_like empty_permuted empty_strided endswith eq eq_ equal erf erf_ erfc erfc_ erfinv erfinv_
    exp exp2 exp2_ exp_ expand expand_as expand_copy expandtabs expm1 expm1_ exponential
    exponential_ extend eye fabs factorial feature_alpha_dropout feature_alpha_dropout_
    feature_dropout feature_dropout_ fft_fft fft_fft2 fft_fftfreq fft_fftn fft_fftshift fft_hfft
    fft_hfft2 fft_hfftn fft_ifft fft_ifft2 fft_ifftn fft_ifftshift fft_ihfft fft_ihfft2 fft_ihfftn
    fft_irfft fft_irfft2 fft_irfftn fft_rfft fft_rfft2 fft_rfftfreq fft_rfftn fill fill_
    fill_diagonal_ find fix fix_ flatten flatten_dense_tensors flip fliplr flipud float_power
    float_power_ floor floor_ floor_divide floor_divide_ floordiv fmax fmin fmod fmod_ format frac
    frac_ fractional_max_pool2d fractional_max_pool3d frexp frobenius_norm full full_like gamma
    gather gcd gcd_ ge ge_ gelu gelu_ geometric geometric_ geqrf ger get get_autocast_dtype
    get_device glu glu_jvp grad gradient greater greater_ greater_equal greater_equal_ grid_sampler
    grid_sampler_2d grid_sampler_3d group_norm gru gru_cell gt gt_ hamming_window hann_window
    hardshrink hardsigmoid hardsigmoid_ hardswish hardswish_ hardtanh hardtanh_ has_torch_function
    hash hash_tensor heaviside heaviside_ hex hinge_embedding_loss histc histogram histogramdd
    hsplit hspmm hstack huber_loss hypot hypot_ i0 i0_ igamma igamma_ igammac igammac_ im2col imag
    index index_add index_add_ index_copy index_copy_ index_fill index_fill_ index_put index_put_
    index_reduce index_reduce_ index_select indices_copy inner insert instance_norm inverse
    is_autocast_cpu_enabled is_autocast_enabled is_complex is_conj is_contiguous is_distributed
    is_floating_point is_grad_enabled is_inference is_leaf is_neg is_non_overlapping_and_dense
    is_nonzero is_owner is_same_size is_scripting is_signed is_strides_like_format isalnum isalpha
    isclose isdecimal isdigit isfinite isidentifier isin isinf islower isnan isneginf isnumeric
    isposinf isprintable isreal isspace istft istitle isupper item items join kaiser_window keys
    kl_div kron kthvalue l1_loss layer_norm lcm lcm_ ldexp ldexp_ le le_ leaky_relu leaky_relu_ len
    lerp lerp_ less less_ less_equal less_equal_ lgamma lgamma_ lift lift_fresh lift_fresh_copy
    linalg__powsum linalg_cholesky linalg_cholesky_ex linalg_cond linalg_cross linalg_det
    linalg_diagonal linalg_eig linalg_eigh linalg_eigvals linalg_eigvalsh linalg_householder_product
    linalg_inv linalg_inv_ex linalg_ldl_factor linalg_ldl_factor_ex linalg_ldl_solve linalg_lstsq
    linalg_lu linalg_lu_factor linalg_lu_factor_ex linalg_lu_solve linalg_matmul linalg_matrix_exp
    linalg_matrix_norm linalg_matrix_power linalg_matrix_rank linalg_matrix_sqrth linalg_multi_dot
    linalg_norm linalg_pinv linalg_polar linalg_qr linalg_slogdet linalg_solve linalg_solve_ex
    linalg_solve_triangular linalg_svd linalg_svdvals linalg_tensorinv linalg_tensorsolve
    linalg_vander linalg_vecdot linalg_vector_norm linear linspace list ljust local_value log log10
    log10_ log1p log1p_ log2 log2_ log_ log_normal log_normal_ log_sigmoid log_sigmoid_forward
    log_softmax logaddexp logaddexp2 logcumsumexp logdet logical_and logical_and_ logical_not
    logical_not_ logical_or logical_or_ logical_xor logical_xor_ logit logit_ logspace logsumexp
    lower lstm lstm_cell lstrip lt lt_ lu_solve lu_unpack mH mT margin_ranking_loss masked_fill
    masked_fill_ masked_scatter masked_scatter_ masked_select mathremainder matmul matrix_H
    matrix_exp matrix_power max max_pool1d max_pool1d_with_indices max_pool2d
    max_pool2d_with_indices max_pool3d max_pool3d_with_indices max_unpool2d max_unpool3d maximum
    mean median meshgrid min minimum mish mish_ mm mode modf moveaxis movedim mse_loss msort mul
    mul_ multi_margin_loss multilabel_margin_loss multilabel_margin_loss_forward multinomial
    multiply multiply_ mv mvlgamma mvlgamma_ nan_to_num nan_to_num_ nanmean nanmedian nanquantile
    nansum narrow narrow_copy native_batch_norm native_channel_shuffle native_dropout
    native_group_norm native_layer_norm native_norm ne ne_ neg neg_ negative negative_ new_empty
    new_empty_strided new_full new_ones new_zeros nextafter nextafter_ nll_loss nll_loss2d
    nll_loss2d_forward nll_loss_forward nll_loss_nd nonzero nonzero_numpy nonzero_static norm
    norm_except_dim normal normal_ normal_functional not_equal not_equal_ nuclear_norm numel numpy_T
    oct one_hot ones ones_like ord orgqr ormqr outer owner owner_name pad pad_sequence
    pairwise_distance partition pdist percentFormat permute permute_copy pinverse pixel_shuffle
    pixel_unshuffle poisson poisson_nll_loss polar polygamma polygamma_ pop popitem positive pow
    pow_ prelu prod promote_types put put_ quantile rad2deg rad2deg_ radians rand rand_like randint
    randint_like randn randn_like random random_ randperm range ravel real reciprocal reciprocal_
    reflection_pad1d reflection_pad2d reflection_pad3d relu relu6 relu6_ relu_ remainder remainder_
    remove renorm renorm_ repeat repeat_interleave replace replication_pad1d replication_pad2d
    replication_pad3d reshape reshape_as resolve_conj resolve_neg result_type reverse rfind rindex
    rjust rms_norm rnn_relu rnn_relu_cell rnn_tanh rnn_tanh_cell roll rot90 round round_ row_stack
    rpartition rrelu rrelu_ rrelu_with_noise rrelu_with_noise_ rrelu_with_noise_functional rsplit
    rsqrt rsqrt_ rstrip rsub scalar_tensor scaled_dot_product_attention scatter scatter_ scatter_add
    scatter_add_ scatter_reduce scatter_reduce_ searchsorted select select_copy select_scatter selu
    selu_ setdefault sgn sgn_ shallow_copy_data_ sigmoid sigmoid_ sign sign_ signbit silu silu_ sin
    sin_ sinc sinc_ sinh sinh_ size slice slice_copy slice_inverse slice_scatter slogdet slow_conv3d
    slow_conv3d_forward slow_conv_dilated2d slow_conv_dilated3d slow_conv_transpose2d
    slow_conv_transpose3d smm smooth_l1_loss soft_margin_loss softmax softplus softshrink sort
    sorted special_airy_ai special_bessel_j0 special_bessel_j1 special_bessel_y0 special_bessel_y1
    special_chebyshev_polynomial_t special_chebyshev_polynomial_u special_chebyshev_polynomial_v
    special_chebyshev_polynomial_w special_digamma special_entr special_erf special_erfc
    special_erfcx special_erfinv special_exp2 special_expit special_expm1 special_gammainc
    special_gammaincc special_gammaln special_hermite_polynomial_h special_hermite_polynomial_he
    special_i0 special_i0e special_i1 special_i1e special_laguerre_polynomial_l
    special_legendre_polynomial_p special_log1p special_log_ndtr special_log_softmax special_logit
    special_logsumexp special_modified_bessel_i0 special_modified_bessel_i1
    special_modified_bessel_k0 special_modified_bessel_k1 special_multigammaln special_ndtr
    special_ndtri special_polygamma special_psi special_round special_scaled_modified_bessel_k0
    special_scaled_modified_bessel_k1 special_shifted_chebyshev_polynomial_t
    special_shifted_chebyshev_polynomial_u special_shifted_chebyshev_polynomial_v
    special_shifted_chebyshev_polynomial_w special_sinc special_softmax special_spherical_bessel_j0
    special_xlog1py special_xlogy special_zeta split split_copy split_with_sizes
    split_with_sizes_copy splitlines sqrt sqrt_ square square_ squeeze squeeze_ squeeze_copy
    sspaddmm stack startswith std std_mean stft storage_offset str stride strip sub sub_ subtract
    subtract_ sum sum_to_size svd swapaxes swapaxes_ swapcase swapdims swapdims_ sym_is_contiguous
    sym_numel sym_size sym_storage_offset sym_stride t t_ t_copy take take_along_dim tan tan_ tanh
    tanh_ tensor tensor_split tensordot threshold threshold_ tile title to to_dense to_here topk
    trace transpose transpose_ transpose_copy trapezoid trapz triangular_solve tril tril_
    tril_indices triplet_margin_loss triu triu_ triu_indices true_divide true_divide_ trunc trunc_
    type_as unbind unbind_copy unflatten unflatten_dense_tensors unfold unfold_copy uniform uniform_
    unique_consecutive unique_dim unique_dim_consecutive unsafe_chunk unsafe_split
    unsafe_split_with_sizes unsqueeze unsqueeze_ unsqueeze_copy update upper upsample_bicubic2d
    upsample_bilinear2d upsample_linear1d upsample_nearest1d upsample_nearest2d upsample_nearest3d
    upsample_trilinear3d values_copy vander var var_mean vdot view view_as view_as_complex
    view_as_complex_copy view_as_real view_as_real_copy view_copy vsplit vstack warn where xlogy
    xlogy_ zero zero_ zeros zeros_like zfill
""")

#: ``torch.<name>`` functions.
TORCH_FUNCTIONS = _names("""
    Size _assert abs abs_ absolute acos acos_ acosh acosh_ adaptive_avg_pool1d adaptive_max_pool1d
    add addbmm addcdiv addcmul addmm addmv addmv_ addr adjoint affine_grid_generator alias_copy all
    allclose alpha_dropout alpha_dropout_ amax amin aminmax angle any arange arccos arccos_ arccosh
    arccosh_ arcsin arcsin_ arcsinh arcsinh_ arctan arctan2 arctan_ arctanh arctanh_ argmax argmin
    argsort argwhere as_tensor asin asin_ asinh asinh_ atan atan2 atan_ atanh atanh_ atleast_1d
    atleast_2d atleast_3d avg_pool1d baddbmm bartlett_window batch_norm bernoulli bilinear
    binary_cross_entropy_with_logits bincount binomial bitwise_and bitwise_left_shift bitwise_not
    bitwise_or bitwise_right_shift bitwise_xor blackman_window block_diag bmm broadcast_shapes
    broadcast_tensors broadcast_to bucketize can_cast cartesian_prod cat cdist ceil ceil_ celu celu_
    chain_matmul channel_shuffle cholesky_inverse cholesky_solve chunk clamp clamp_ clamp_max
    clamp_max_ clamp_min clamp_min_ clip clip_ clone column_stack combinations complex concat
    concatenate conj conj_physical conj_physical_ constant_pad_nd conv1d conv2d conv3d conv_tbc
    conv_transpose1d conv_transpose2d conv_transpose3d convolution copysign corrcoef cos cos_ cosh
    cosh_ cosine_embedding_loss cosine_similarity count_nonzero cov cross ctc_loss cummax cummin
    cumprod cumsum cumulative_trapezoid deg2rad deg2rad_ det detach detach_ detach_copy diag
    diag_embed diagflat diagonal diagonal_copy diagonal_scatter diff digamma dist div divide dot
    dropout dropout_ dsplit dstack einsum embedding embedding_bag embedding_renorm_ empty empty_like
    empty_permuted empty_strided eq equal erf erf_ erfc erfc_ erfinv exp exp2 exp2_ exp_ expand_copy
    expm1 expm1_ eye feature_alpha_dropout feature_alpha_dropout_ feature_dropout feature_dropout_
    fill fill_ finfo fix fix_ flatten flip fliplr flipud float_power floor floor_ floor_divide fmax
    fmin fmod frac frac_ frexp frobenius_norm full full_like gather gcd gcd_ ge geqrf ger
    get_autocast_dtype get_default_dtype get_device gradient greater greater_equal grid_sampler
    grid_sampler_2d grid_sampler_3d group_norm gru gru_cell gt hamming_window hann_window hardshrink
    hash_tensor heaviside hinge_embedding_loss histc histogram histogramdd hsplit hspmm hstack hypot
    i0 i0_ igamma igammac iinfo imag index_add index_copy index_fill index_put index_put_
    index_reduce index_select indices_copy inner instance_norm inverse is_autocast_cpu_enabled
    is_autocast_enabled is_complex is_conj is_distributed is_floating_point is_grad_enabled
    is_inference is_neg is_nonzero is_same_size is_signed is_tensor isclose isfinite isin isinf
    isnan isneginf isposinf isreal istft kaiser_window kl_div kron kthvalue layer_norm lcm lcm_
    ldexp ldexp_ le lerp less less_equal lgamma linspace log log10 log10_ log1p log1p_ log2 log2_
    log_ log_softmax logaddexp logaddexp2 logcumsumexp logdet logical_and logical_not logical_or
    logical_xor logit logit_ logspace logsumexp lstm lstm_cell lt lu_solve lu_unpack
    margin_ranking_loss masked_fill masked_scatter masked_select matmul matrix_exp matrix_power max
    max_pool1d max_pool1d_with_indices max_pool2d max_pool3d maximum mean median meshgrid min
    minimum mm mode moveaxis movedim msort mul multinomial multiply mv mvlgamma nan_to_num
    nan_to_num_ nanmean nanmedian nanquantile nansum narrow narrow_copy native_batch_norm
    native_channel_shuffle native_dropout native_group_norm native_layer_norm native_norm ne neg
    neg_ negative negative_ nextafter nonzero nonzero_static norm norm_except_dim normal not_equal
    nuclear_norm numel ones ones_like orgqr ormqr outer pairwise_distance pdist permute permute_copy
    pinverse pixel_shuffle pixel_unshuffle poisson poisson_nll_loss polar polygamma positive pow
    prelu prod promote_types put quantile rad2deg rad2deg_ rand rand_like randint randint_like randn
    randn_like randperm range ravel real reciprocal reciprocal_ relu relu_ remainder renorm
    repeat_interleave reshape resolve_conj resolve_neg result_type rms_norm rnn_relu rnn_relu_cell
    rnn_tanh rnn_tanh_cell roll rot90 round round_ row_stack rrelu rrelu_ rsqrt rsqrt_ rsub
    scalar_tensor scatter scatter_add scatter_reduce searchsorted select select_copy select_scatter
    selu selu_ sgn sigmoid sigmoid_ sign signbit sin sin_ sinc sinc_ sinh sinh_ slice_copy
    slice_inverse slice_scatter slogdet smm softmax sort split split_copy split_with_sizes
    split_with_sizes_copy sqrt sqrt_ square square_ squeeze squeeze_copy sspaddmm stack std std_mean
    stft sub subtract sum svd swapaxes swapdims sym_float sym_int sym_ite sym_max sym_min sym_not
    sym_sum t t_copy take take_along_dim tan tan_ tanh tanh_ tensor tensor_split tensordot threshold
    threshold_ tile topk trace transpose transpose_copy trapezoid trapz triangular_solve tril
    tril_indices triplet_margin_loss triu triu_indices true_divide trunc trunc_ unbind unbind_copy
    unflatten unfold_copy unique unique_consecutive unravel_index unsafe_chunk unsafe_split
    unsafe_split_with_sizes unsqueeze unsqueeze_copy values_copy vander var var_mean vdot
    view_as_complex view_as_complex_copy view_as_real view_as_real_copy view_copy vsplit vstack
    where xlogy xlogy_ zero_ zeros zeros_like
""")

#: ``torch.nn.functional.<name>`` functions.
FUNCTIONAL = _names("""
    adaptive_avg_pool1d adaptive_avg_pool2d adaptive_avg_pool3d adaptive_max_pool1d
    adaptive_max_pool1d_with_indices adaptive_max_pool2d adaptive_max_pool2d_with_indices
    adaptive_max_pool3d adaptive_max_pool3d_with_indices affine_grid alpha_dropout avg_pool1d
    avg_pool2d avg_pool3d batch_norm bilinear binary_cross_entropy binary_cross_entropy_with_logits
    celu celu_ channel_shuffle conv1d conv2d conv3d conv_tbc conv_transpose1d conv_transpose2d
    conv_transpose3d cosine_embedding_loss cosine_similarity cross_entropy ctc_loss dropout
    dropout1d dropout2d dropout3d elu elu_ embedding embedding_bag feature_alpha_dropout fold
    fractional_max_pool2d fractional_max_pool2d_with_indices fractional_max_pool3d
    fractional_max_pool3d_with_indices gaussian_nll_loss gelu glu grid_sample group_norm grouped_mm
    gumbel_softmax hardshrink hardsigmoid hardswish hardtanh hardtanh_ hinge_embedding_loss
    huber_loss instance_norm interpolate kl_div l1_loss layer_norm leaky_relu leaky_relu_ linear
    linear_cross_entropy local_response_norm log_softmax logsigmoid lp_pool1d lp_pool2d lp_pool3d
    margin_ranking_loss max_pool1d max_pool1d_with_indices max_pool2d max_pool2d_with_indices
    max_pool3d max_pool3d_with_indices max_unpool1d max_unpool2d max_unpool3d mish mse_loss
    multi_head_attention_forward multi_margin_loss multilabel_margin_loss
    multilabel_soft_margin_loss native_channel_shuffle nll_loss normalize one_hot pad
    pairwise_distance pdist pixel_shuffle pixel_unshuffle poisson_nll_loss prelu relu relu6 relu_
    rms_norm rrelu rrelu_ scaled_dot_product_attention scaled_grouped_mm scaled_mm selu selu_
    sigmoid silu smooth_l1_loss soft_margin_loss softmax softmin softplus softshrink softsign tanh
    tanhshrink threshold threshold_ triplet_margin_loss triplet_margin_with_distance_loss unfold
    upsample upsample_bilinear upsample_nearest
""")

#: ``operator.<name>``: arithmetic, comparisons, item access. No attrgetter/itemgetter/methodcaller/call.
OPERATOR = _names("""
    abs add and_ concat contains eq floordiv ge getitem gt iadd iand iconcat ifloordiv ilshift imatmul
    imod imul index inv invert ior ipow irshift is_ is_not isub itruediv ixor le lshift lt matmul mod
    mul ne neg not_ or_ pos pow rshift setitem sub truediv truth xor
""")

#: ``math.<name>``.
MATH = _names("""
    acos acosh asin asinh atan atan2 atanh ceil copysign cos cosh degrees erf erfc exp expm1 fabs
    floor fmod gcd hypot isclose isfinite isinf isnan lcm log log10 log1p log2 pow radians remainder
    sin sinh sqrt tan tanh trunc
""")

#: ``builtins.<name>``. ``getattr`` only with a constant attribute name from :data:`GETATTR_NAMES`.
BUILTINS = _names("""
    getattr len int float bool min max abs round tuple list
""")

#: ``fxprune.ops.<name>``: fxprune's own functional ops.
FXPRUNE_OPS = _names("""
    window_attention
""")

#: Exact ``module:qualname`` paths of library functions that captured graphs call (torch.fx-wrapped
#: helpers of torchvision and timm). The module named here is imported to resolve it, no other.
LIBRARY_FUNCTIONS = _names("""
    torchvision.ops.stochastic_depth:stochastic_depth
    torchvision.models.swin_transformer:_get_relative_position_bias
    torchvision.models.swin_transformer:_patch_merging_pad
    torchvision.models.swin_transformer:shifted_window_attention
    torchvision.models.googlenet:GoogLeNetOutputs
    torchvision.models.inception:InceptionOutputs
    timm.models.maxxvit:window_reverse_nchw timm.models.mvitv2:reshape_post_pool
    timm.models.vision_transformer_sam:get_rel_pos timm.layers.pos_embed_sincos:_build_grid
    timm.models.maxxvit:grid_reverse timm.models.nest:deblockify timm.models.maxxvit:grid_reverse_nchw
    timm.models.qwen3_vit:resample_pos_embed_grid timm.models.mvitv2:cal_rel_pos_type
    timm.models.crossvit:scale_image timm.models.naflexvit:global_pool_naflex
    timm.models.swin_transformer_v2_cr:window_reverse timm.layers.pos_embed_sincos:_apply_coord_augs
    timm.models.naflexvit:create_attention_mask timm.layers.pos_embed_sincos:get_mixed_grid
    timm.layers.attention:maybe_add_mask timm.layers.pos_embed_sincos:_freq_buffer_dtype
    timm.models.swin_transformer_v2:window_reverse timm.layers.attention:resolve_self_attn_mask
    timm.layers.pos_embed_sincos:make_coords_dinov3 timm.models.davit:window_reverse
    timm.layers.pos_embed:resample_abs_pos_embed timm.models.hiera:get_resized_mask
    timm.layers.pos_embed:resample_abs_pos_embed_nhwc timm.models.mvitv2:reshape_pre_pool
    timm.models.swin_transformer:window_reverse timm.models.swin_transformer:window_partition
    timm.models.gcvit:window_reverse timm.models.maxxvit:window_reverse
""")

#: Exact ``module:qualname`` paths of library module classes that captured graphs keep as leaves
#: (timm's ``_leaf_modules``).
LIBRARY_CLASSES = _names("""
    timm.layers.conv2d_same:Conv2dSame timm.layers.pool2d_same:AvgPool2dSame
    timm.layers.pool2d_same:MaxPool2dSame timm.layers.norm_act:BatchNormAct2d
    timm.layers.norm_act:FrozenBatchNormAct2d timm.layers.cond_conv2d:CondConv2d
    timm.layers.std_conv:StdConv2dSame timm.layers.std_conv:ScaledStdConv2dSame
    timm.layers.non_local_attn:BilinearAttnTransform timm.models.efficientvit_msra:LocalWindowAttention
    timm.models.tiny_vit:TinyVitBlock timm.models.convit:GPSA timm.models.efficientvit_mit:LiteMLA
    timm.models.mobilevit:MobileVitV2Block timm.models.mobilevit:MobileVitBlock
    timm.models.xcit:PositionalEncodingFourier timm.models.vgg:ConvMlp timm.models.twins:LocallyGroupedAttn
    timm.models.edgenext:PositionalEncodingFourier timm.models.nfnet:NormFreeBlock
""")

#: ``torch.nn`` module classes (the layers a captured graph keeps as ``call_module`` leaves). Not
#: ``SyncBatchNorm`` (collective communication) nor the ``DataParallel`` wrappers.
NN_MODULE_CLASSES = _names("""
    AdaptiveAvgPool1d AdaptiveAvgPool2d AdaptiveAvgPool3d AdaptiveLogSoftmaxWithLoss
    AdaptiveMaxPool1d AdaptiveMaxPool2d AdaptiveMaxPool3d AlphaDropout AvgPool1d AvgPool2d AvgPool3d
    BCELoss BCEWithLogitsLoss BatchNorm1d BatchNorm2d BatchNorm3d Bilinear CELU CTCLoss
    ChannelShuffle CircularPad1d CircularPad2d CircularPad3d ConstantPad1d ConstantPad2d
    ConstantPad3d Container Conv1d Conv2d Conv3d ConvTranspose1d ConvTranspose2d ConvTranspose3d
    CosineEmbeddingLoss CosineSimilarity CrossEntropyLoss CrossMapLRN2d Dropout Dropout1d Dropout2d
    Dropout3d ELU Embedding EmbeddingBag FeatureAlphaDropout Flatten Fold FractionalMaxPool2d
    FractionalMaxPool3d GELU GLU GRU GRUCell GaussianNLLLoss GroupNorm Hardshrink Hardsigmoid
    Hardswish Hardtanh HingeEmbeddingLoss HuberLoss Identity InstanceNorm1d InstanceNorm2d
    InstanceNorm3d KLDivLoss L1Loss LPPool1d LPPool2d LPPool3d LSTM LSTMCell LayerNorm
    LazyBatchNorm1d LazyBatchNorm2d LazyBatchNorm3d LazyConv1d LazyConv2d LazyConv3d
    LazyConvTranspose1d LazyConvTranspose2d LazyConvTranspose3d LazyInstanceNorm1d
    LazyInstanceNorm2d LazyInstanceNorm3d LazyLinear LeakyReLU Linear LinearCrossEntropyLoss
    LinearCrossEntropyOptions LocalResponseNorm LogSigmoid LogSoftmax MSELoss MarginRankingLoss
    MaxPool1d MaxPool2d MaxPool3d MaxUnpool1d MaxUnpool2d MaxUnpool3d Mish Module ModuleDict
    ModuleList MultiLabelMarginLoss MultiLabelSoftMarginLoss MultiMarginLoss MultiheadAttention
    NLLLoss NLLLoss2d PReLU PairwiseDistance ParameterDict ParameterList PixelShuffle PixelUnshuffle
    PoissonNLLLoss RMSNorm RNN RNNBase RNNCell RNNCellBase RReLU ReLU ReLU6 ReflectionPad1d
    ReflectionPad2d ReflectionPad3d ReplicationPad1d ReplicationPad2d ReplicationPad3d SELU
    Sequential SiLU Sigmoid SmoothL1Loss SoftMarginLoss Softmax Softmax2d Softmin Softplus
    Softshrink Softsign Tanh Tanhshrink Threshold Transformer TransformerDecoder
    TransformerDecoderLayer TransformerEncoder TransformerEncoderLayer TripletMarginLoss
    TripletMarginWithDistanceLoss Unflatten Unfold Upsample UpsamplingBilinear2d UpsamplingNearest2d
    ZeroPad1d ZeroPad2d ZeroPad3d
""")

#: Method names a graph may call (``call_method``): tensor maths and shape queries.
TENSOR_METHODS = _names("""
    abs abs_ absolute absolute_ acos acos_ acosh acosh_ add add_ addbmm addbmm_ addcdiv addcdiv_
    addcmul addcmul_ addmm addmm_ addmv addmv_ addr addr_ adjoint all allclose amax amin aminmax
    angle any arccos arccos_ arccosh arccosh_ arcsin arcsin_ arcsinh arcsinh_ arctan arctan2
    arctan2_ arctan_ arctanh arctanh_ argmax argmin argsort argwhere asin asin_ asinh asinh_ atan
    atan2 atan2_ atan_ atanh atanh_ baddbmm baddbmm_ bernoulli bernoulli_ bfloat16 bincount
    bitwise_and bitwise_and_ bitwise_left_shift bitwise_left_shift_ bitwise_not bitwise_not_
    bitwise_or bitwise_or_ bitwise_right_shift bitwise_right_shift_ bitwise_xor bitwise_xor_ bmm
    bool broadcast_to byte cauchy_ ceil ceil_ chalf char cholesky_inverse cholesky_solve chunk clamp
    clamp_ clamp_max clamp_max_ clamp_min clamp_min_ clip clip_ clone conj conj_physical
    conj_physical_ contiguous copy_ copysign copysign_ corrcoef cos cos_ cosh cosh_ count_nonzero
    cov cpu cross cummax cummin cumprod cumprod_ cumsum cumsum_ deg2rad deg2rad_ dense_dim det
    detach detach_ diag diag_embed diagflat diagonal diagonal_scatter diff digamma digamma_ dim
    dim_order dist div div_ divide divide_ dot double dsplit element_size eq eq_ equal erf erf_ erfc
    erfc_ erfinv erfinv_ exp exp2 exp2_ exp_ expand expand_as expm1 expm1_ exponential_ fill_
    fill_diagonal_ fix fix_ flatten flip fliplr flipud float float_power float_power_ floor floor_
    floor_divide floor_divide_ fmax fmin fmod fmod_ frac frac_ frexp gather gcd gcd_ ge ge_
    geometric_ geqrf ger get_device greater greater_ greater_equal greater_equal_ gt gt_ half
    hardshrink hash_tensor heaviside heaviside_ histc histogram hsplit hypot hypot_ i0 i0_ igamma
    igamma_ igammac igammac_ index index_add index_add_ index_copy index_copy_ index_fill
    index_fill_ index_put index_put_ index_reduce index_reduce_ index_select inner int inverse
    is_complex is_conj is_contiguous is_distributed is_floating_point is_inference is_neg is_nonzero
    is_same_size is_signed isclose isfinite isinf isnan isneginf isposinf isreal istft item kron
    kthvalue lcm lcm_ ldexp ldexp_ le le_ lerp lerp_ less less_ less_equal less_equal_ lgamma
    lgamma_ log log10 log10_ log1p log1p_ log2 log2_ log_ log_normal_ log_softmax logaddexp
    logaddexp2 logcumsumexp logdet logical_and logical_and_ logical_not logical_not_ logical_or
    logical_or_ logical_xor logical_xor_ logit logit_ logsumexp long lt lt_ lu_solve masked_fill
    masked_fill_ masked_scatter masked_scatter_ masked_select matmul matrix_exp matrix_power max
    maximum mean median min minimum mm mode moveaxis movedim msort mul mul_ multinomial multiply
    multiply_ mv mvlgamma mvlgamma_ nan_to_num nan_to_num_ nanmean nanmedian nanquantile nansum
    narrow narrow_copy ndimension ne ne_ neg neg_ negative negative_ nelement new_empty
    new_empty_strided new_full new_ones new_tensor new_zeros nextafter nextafter_ nonzero
    nonzero_static norm normal_ not_equal not_equal_ numel orgqr ormqr outer permute pinverse
    polygamma polygamma_ positive pow pow_ prelu prod put put_ quantile rad2deg rad2deg_ random_
    ravel reciprocal reciprocal_ relu relu_ remainder remainder_ renorm renorm_ repeat
    repeat_interleave reshape reshape_as resolve_conj resolve_neg roll rot90 round round_ rsqrt
    rsqrt_ scatter scatter_ scatter_add scatter_add_ scatter_reduce scatter_reduce_ select
    select_scatter sgn sgn_ short sigmoid sigmoid_ sign sign_ signbit sin sin_ sinc sinc_ sinh sinh_
    size slice_inverse slice_scatter slogdet smm softmax sort split split_with_sizes sqrt sqrt_
    square square_ squeeze squeeze_ sspaddmm std stft storage_offset stride sub sub_ subtract
    subtract_ sum sum_to_size svd swapaxes swapaxes_ swapdims swapdims_ t t_ take take_along_dim tan
    tan_ tanh tanh_ tensor_split tile to to_dense tolist topk trace transpose transpose_
    triangular_solve tril tril_ triu triu_ true_divide true_divide_ trunc trunc_ type_as unbind
    unflatten unfold uniform_ unique unique_consecutive unsafe_chunk unsafe_split
    unsafe_split_with_sizes unsqueeze unsqueeze_ var vdot view view_as vsplit where xlogy xlogy_
    zero_
""")

#: Attribute names ``getattr(x, NAME)`` may read in a graph (tensor properties, named-tuple fields).
GETATTR_NAMES = _names("""
    shape dtype device ndim T mT H mH real imag is_cuda is_meta is_sparse is_quantized layout
    requires_grad itemsize nbytes data grad values indices training
""")

#: Types a node annotation may name (cosmetic: other annotations are dropped on load).
TYPE_NAMES = {
    "builtins:int": int, "builtins:float": float, "builtins:bool": bool, "builtins:str": str,
    "builtins:complex": complex, "builtins:tuple": tuple, "builtins:list": list, "builtins:dict": dict,
    "builtins:slice": slice, "torch:Tensor": torch.Tensor, "torch:Size": torch.Size,
    "torch:dtype": torch.dtype, "torch:device": torch.device,
}

_NAMESPACES: dict[str, tuple[Any, frozenset[str]]] = {
    "torch": (torch, TORCH_FUNCTIONS),
    "torch.nn.functional": (F, FUNCTIONAL),
    "operator": (operator, OPERATOR),
    "_operator": (operator, OPERATOR),
    "math": (math, MATH),
    "builtins": (builtins, BUILTINS),
}


def _split(path: Any) -> tuple[str, str] | None:
    if not isinstance(path, str) or path.count(":") != 1:
        return None
    module, _, name = path.partition(":")
    return (module, name) if module and name else None


def _library_attr(path: str) -> Any:
    """The object at a fixed library path from this file's tables (imports that fixed module)."""
    module_name, _, qualname = path.partition(":")
    try:
        module = sys.modules.get(module_name) or importlib.import_module(module_name)
        return getattr(module, qualname)
    except (ImportError, AttributeError):
        return None


def lookup_callable(path: Any) -> Any:
    """The allow-listed function named ``module:name``, or ``None`` (nothing is imported for a miss)."""
    parts = _split(path)
    if parts is None:
        return None
    module, name = parts
    if module in _NAMESPACES:
        namespace, allowed = _NAMESPACES[module]
        if name not in allowed:
            return None
        return getattr(namespace, name, None)
    if module == "fxprune.ops" and name in FXPRUNE_OPS:
        from fxprune import ops

        return getattr(ops, name, None)
    if path in LIBRARY_FUNCTIONS:
        return _library_attr(path)
    return None


def allowed_op(name: Any) -> bool:
    """Whether ``namespace::op`` (e.g. ``aten::add``) is an allow-listed operator (any overload)."""
    if not isinstance(name, str) or name.count("::") != 1:
        return False
    namespace, _, op = name.partition("::")
    return namespace == "aten" and op in ATEN_OPS


def lookup_module_class(path: Any) -> type[nn.Module] | None:
    """The allow-listed ``nn.Module`` class named ``module:Qualname``, or ``None``."""
    parts = _split(path)
    if parts is None:
        return None
    module, name = parts
    cls = None
    if name in NN_MODULE_CLASSES and (module in ("torch.nn", "torch.nn.modules") or module.startswith("torch.nn.modules.")):
        cls = getattr(nn, name, None)
        if cls is not None and module not in ("torch.nn", "torch.nn.modules") and cls.__module__ != module:
            return None  # torch.nn.modules.conv:Linear is not a real path
    elif path in LIBRARY_CLASSES:
        cls = _library_attr(path)
    return cls if isinstance(cls, type) and issubclass(cls, nn.Module) else None


def lookup_type(path: Any) -> type | None:
    """A type a node annotation may name, or ``None`` (the annotation is then dropped)."""
    return TYPE_NAMES.get(path) if isinstance(path, str) else None


def lookup_enum(path: Any) -> type | None:
    """Enum classes a saved value may name: none are needed by fxprune's graphs."""
    return None


# Pytree output types (``module.Qualname``) of Hugging Face models: the module is imported so that
# the output class registers itself with torch's pytree. Only these two shapes of module name.
_SPEC_MODULES = (re.compile(r"transformers\.modeling_outputs"),
                 re.compile(r"transformers\.models\.[a-z0-9_]+\.modeling_[a-z0-9_]+"))
_SPEC_BUILTINS = frozenset({"builtins.tuple", "builtins.list", "builtins.dict", "collections.OrderedDict",
                            "collections.defaultdict", "collections.namedtuple", "collections.deque",
                            "torch.Size"})


def spec_type_module(name: Any) -> str | None:
    """The module to import so that the pytree type ``name`` is registered, or ``None`` if not allowed."""
    if not isinstance(name, str):
        return None
    module, _, cls = name.rpartition(".")
    if not cls.isidentifier() or cls.startswith("_"):
        return None
    return module if any(p.fullmatch(module) for p in _SPEC_MODULES) else None


def allowed_spec_type(name: Any) -> bool:
    """Whether a pytree spec may name the type ``name``."""
    return name in _SPEC_BUILTINS or spec_type_module(name) is not None
