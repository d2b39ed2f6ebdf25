// TensorRT IPluginV3 glue for the routing ops of the ONNX domain mllm_deploy (TokenSelect,
// TokenScatter, VisualScore). Only shapes, types, fields and the enqueue call live here; the
// kernels are the C ABI of plugins/cuda/routing_kernels.h, tested on their own against the NumPy
// references (plugins/ops.py).
//
// Built against the TensorRT headers only (no libnvinfer link), so one binary serves every runtime
// of its headers' major version and can be serialized with version-compatible engines. Not across
// majors: the IPluginV3 interfaces have the same vtables in the 10.x and 11.x headers, but TensorRT 11
// derives ILogger and ILoggerFinder from IVersionedInterface, which moves log() and findLogger(), so
// a 10.x build calling the logger of an 11.x runtime (or the reverse) would call the wrong method.
// TensorRT finds the creators through the exported getCreators(); setLoggerFinder() gives us its
// logger. Field names and types must match plugins/trt_fields.py (a test checks this file).
#include <NvInferRuntime.h>
#include <NvInferVersion.h>
#include <cuda_runtime_api.h>

#include "routing_kernels.h"

#include <cstring>
#include <exception>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

static_assert(NV_TENSORRT_MAJOR >= 10, "the mllm_deploy plugins need TensorRT 10 or newer (IPluginV3)");

using namespace nvinfer1;

namespace mllm_trt
{
namespace
{
constexpr char const* kPluginNamespace = "mllm_deploy";
constexpr char const* kPluginVersion = "1";

ILoggerFinder* gLoggerFinder{nullptr};

void logError(std::string const& message) noexcept
{
    try
    {
        ILogger* logger = gLoggerFinder != nullptr ? gLoggerFinder->findLogger() : nullptr;
        if (logger != nullptr)
            logger->log(ILogger::Severity::kERROR, ("[mllm_deploy plugins] " + message).c_str());
    }
    catch (...)
    {
    }
}

bool isActivation(DataType type)
{
    return type == DataType::kFLOAT || type == DataType::kHALF;
}

int32_t kernelDtype(DataType type)
{
    return type == DataType::kHALF ? MLLM_DTYPE_FLOAT16 : MLLM_DTYPE_FLOAT32;
}

int32_t kernelStatus(char const* op, int32_t status) noexcept
{
    if (status == MLLM_OK)
        return 0;
    logError(std::string(op) + " kernel failed: " + mllm_last_error());
    return -1;
}

// ---- field parsing (the ONNX parser converts node attributes to the types getFieldNames() asks for) --
PluginField const* findField(PluginFieldCollection const* fc, char const* name)
{
    for (int32_t i = 0; fc != nullptr && i < fc->nbFields; ++i)
        if (fc->fields[i].name != nullptr && std::strcmp(fc->fields[i].name, name) == 0)
            return &fc->fields[i];
    return nullptr;
}

int32_t intField(PluginFieldCollection const* fc, char const* name)
{
    PluginField const* field = findField(fc, name);
    if (field == nullptr || field->data == nullptr || field->length < 1)
        throw std::runtime_error(std::string("missing int field ") + name);
    if (field->type == PluginFieldType::kINT32)
        return *static_cast<int32_t const*>(field->data);
    if (field->type == PluginFieldType::kINT64)
        return static_cast<int32_t>(*static_cast<int64_t const*>(field->data));
    throw std::runtime_error(std::string("field ") + name + " must be INT32");
}

float floatField(PluginFieldCollection const* fc, char const* name)
{
    PluginField const* field = findField(fc, name);
    if (field == nullptr || field->data == nullptr || field->length < 1)
        throw std::runtime_error(std::string("missing float field ") + name);
    if (field->type == PluginFieldType::kFLOAT32)
        return *static_cast<float const*>(field->data);
    if (field->type == PluginFieldType::kFLOAT64)
        return static_cast<float>(*static_cast<double const*>(field->data));
    throw std::runtime_error(std::string("field ") + name + " must be FLOAT32");
}

// kCHAR fields carry `length` bytes, with or without a terminating NUL.
std::string stringField(PluginFieldCollection const* fc, char const* name)
{
    PluginField const* field = findField(fc, name);
    if (field == nullptr || field->data == nullptr || field->type != PluginFieldType::kCHAR)
        throw std::runtime_error(std::string("missing string field ") + name);
    char const* text = static_cast<char const*>(field->data);
    size_t length = 0;
    while (length < static_cast<size_t>(field->length) && text[length] != '\0')
        ++length;
    return std::string(text, length);
}

int32_t choice(std::string const& value, std::vector<char const*> const& choices, char const* name)
{
    for (size_t i = 0; i < choices.size(); ++i)
        if (value == choices[i])
            return static_cast<int32_t>(i);
    throw std::runtime_error(std::string("bad value '") + value + "' for " + name);
}

// Order = the kernel enums (routing_kernels.h) = plugins/ops.py's tuples.
std::vector<char const*> const kQueryRows{"last_text", "text", "visual_and_text"};
std::vector<char const*> const kHeadReductions{"mean", "max"};
std::vector<char const*> const kCombines{"single", "self_times_cross"};

// ---- the shared plugin base -------------------------------------------------------------------------
class RoutingPlugin : public IPluginV3, public IPluginV3OneCore, public IPluginV3OneBuild, public IPluginV3OneRuntime
{
public:
    IPluginCapability* getCapabilityInterface(PluginCapabilityType type) noexcept override
    {
        switch (type)
        {
        case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
        case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
        case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
        }
        return nullptr;
    }

    AsciiChar const* getPluginVersion() const noexcept override
    {
        return kPluginVersion;
    }

    AsciiChar const* getPluginNamespace() const noexcept override
    {
        return kPluginNamespace;
    }

    int32_t configurePlugin(DynamicPluginTensorDesc const* /*in*/, int32_t /*nbInputs*/,
        DynamicPluginTensorDesc const* /*out*/, int32_t /*nbOutputs*/) noexcept override
    {
        return 0;
    }

    int32_t onShapeChange(PluginTensorDesc const* /*in*/, int32_t /*nbInputs*/, PluginTensorDesc const* /*out*/,
        int32_t /*nbOutputs*/) noexcept override
    {
        return 0; // every size is read from the descriptors at enqueue
    }

    IPluginV3* attachToContext(IPluginResourceContext* /*context*/) noexcept override
    {
        return clone(); // no per-context resources
    }

    PluginFieldCollection const* getFieldsToSerialize() noexcept override
    {
        mSerialized.clear();
        addFields(mSerialized);
        mCollection.nbFields = static_cast<int32_t>(mSerialized.size());
        mCollection.fields = mSerialized.data();
        return &mCollection;
    }

protected:
    virtual void addFields(std::vector<PluginField>& fields) = 0;

private:
    std::vector<PluginField> mSerialized;
    PluginFieldCollection mCollection{};
};

// ---- TokenSelect: (scores, vis_start, data, positions) -> (data_out, positions_out, rows_out) --------
class TokenSelectPlugin final : public RoutingPlugin
{
public:
    TokenSelectPlugin(int32_t k, int32_t nVis)
        : mK(k)
        , mNVis(nVis)
    {
        if (nVis <= 0 || k <= 0 || k > nVis)
            throw std::runtime_error("TokenSelect needs 0 < k <= n_vis");
    }

    AsciiChar const* getPluginName() const noexcept override
    {
        return "TokenSelect";
    }

    IPluginV3* clone() noexcept override
    {
        try
        {
            return new TokenSelectPlugin(mK, mNVis);
        }
        catch (...)
        {
            return nullptr;
        }
    }

    int32_t getNbOutputs() const noexcept override
    {
        return 3;
    }

    int32_t getOutputDataTypes(
        DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes, int32_t nbInputs) const noexcept override
    {
        if (nbInputs != 4 || nbOutputs != 3)
            return -1;
        outputTypes[0] = inputTypes[2];
        outputTypes[1] = DataType::kINT64;
        outputTypes[2] = DataType::kINT64;
        return 0;
    }

    int32_t getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const* /*shapeInputs*/,
        int32_t /*nbShapeInputs*/, DimsExprs* outputs, int32_t nbOutputs, IExprBuilder& exprBuilder) noexcept override
    {
        if (nbInputs != 4 || nbOutputs != 3 || inputs[2].nbDims != 3 || inputs[3].nbDims != 2)
            return -1;
        // kept rows = seq_len - (n_vis - k): the text rows and the k best visual rows
        IDimensionExpr const* kept
            = exprBuilder.operation(DimensionOperation::kSUB, *inputs[2].d[1], *exprBuilder.constant(mNVis - mK));
        outputs[0].nbDims = 3;
        outputs[0].d[0] = inputs[2].d[0];
        outputs[0].d[1] = kept;
        outputs[0].d[2] = inputs[2].d[2];
        outputs[1].nbDims = 2;
        outputs[1].d[0] = inputs[3].d[0];
        outputs[1].d[1] = kept;
        outputs[2].nbDims = 1;
        outputs[2].d[0] = kept;
        return 0;
    }

    bool supportsFormatCombination(
        int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t /*nbInputs*/, int32_t /*nbOutputs*/) noexcept override
    {
        PluginTensorDesc const& desc = inOut[pos].desc;
        if (desc.format != TensorFormat::kLINEAR)
            return false;
        switch (pos)
        {
        case 0: return desc.type == DataType::kFLOAT;              // scores
        case 2: return isActivation(desc.type);                    // data
        case 4: return desc.type == inOut[2].desc.type;            // data_out
        case 1: case 3: case 5: case 6: return desc.type == DataType::kINT64; // vis_start, positions, outputs
        default: return false;
        }
    }

    size_t getWorkspaceSize(DynamicPluginTensorDesc const* /*inputs*/, int32_t /*nbInputs*/,
        DynamicPluginTensorDesc const* /*outputs*/, int32_t /*nbOutputs*/) const noexcept override
    {
        return mllm_token_select_workspace(mNVis);
    }

    int32_t enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* /*outputDesc*/,
        void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept override
    {
        Dims const& data = inputDesc[2].dims; // [1, seq_len, hidden]
        return kernelStatus("TokenSelect",
            mllm_token_select(static_cast<float const*>(inputs[0]), static_cast<int64_t const*>(inputs[1]), inputs[2],
                static_cast<int64_t const*>(inputs[3]), outputs[0], static_cast<int64_t*>(outputs[1]),
                static_cast<int64_t*>(outputs[2]), data.d[1], data.d[2], mNVis, mK, kernelDtype(inputDesc[2].type),
                workspace, stream));
    }

protected:
    void addFields(std::vector<PluginField>& fields) override
    {
        fields.emplace_back("k", &mK, PluginFieldType::kINT32, 1);
        fields.emplace_back("n_vis", &mNVis, PluginFieldType::kINT32, 1);
    }

private:
    int32_t mK;
    int32_t mNVis;
};

// ---- TokenScatter: (base, updates, rows[, skip_scale]) -> out ------------------------------------------
class TokenScatterPlugin final : public RoutingPlugin
{
public:
    AsciiChar const* getPluginName() const noexcept override
    {
        return "TokenScatter";
    }

    IPluginV3* clone() noexcept override
    {
        try
        {
            auto* copy = new TokenScatterPlugin();
            copy->mHasSkipScale = mHasSkipScale;
            return copy;
        }
        catch (...)
        {
            return nullptr;
        }
    }

    int32_t getNbOutputs() const noexcept override
    {
        return 1;
    }

    int32_t getOutputDataTypes(
        DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes, int32_t nbInputs) const noexcept override
    {
        if ((nbInputs != 3 && nbInputs != 4) || nbOutputs != 1)
            return -1;
        outputTypes[0] = inputTypes[0];
        return 0;
    }

    int32_t getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const* /*shapeInputs*/,
        int32_t /*nbShapeInputs*/, DimsExprs* outputs, int32_t nbOutputs, IExprBuilder& /*exprBuilder*/) noexcept override
    {
        if ((nbInputs != 3 && nbInputs != 4) || nbOutputs != 1 || inputs[0].nbDims != 3)
            return -1;
        outputs[0] = inputs[0];
        return 0;
    }

    bool supportsFormatCombination(
        int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t /*nbInputs*/, int32_t /*nbOutputs*/) noexcept override
    {
        PluginTensorDesc const& desc = inOut[pos].desc;
        if (desc.format != TensorFormat::kLINEAR)
            return false;
        if (pos == 0)
            return isActivation(desc.type);
        if (pos == 2)
            return desc.type == DataType::kINT64; // rows
        return desc.type == inOut[0].desc.type;   // updates, skip_scale, out
    }

    int32_t enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* /*outputDesc*/,
        void const* const* inputs, void* const* outputs, void* /*workspace*/, cudaStream_t stream) noexcept override
    {
        Dims const& base = inputDesc[0].dims;  // [1, seq_len, hidden]
        Dims const& rows = inputDesc[2].dims;  // [n_rows]
        void const* skipScale = mHasSkipScale ? inputs[3] : nullptr;
        return kernelStatus("TokenScatter",
            mllm_token_scatter(inputs[0], inputs[1], static_cast<int64_t const*>(inputs[2]), skipScale, outputs[0],
                base.d[1], base.d[2], rows.d[0], kernelDtype(inputDesc[0].type), stream));
    }

    int32_t configurePlugin(DynamicPluginTensorDesc const* /*in*/, int32_t nbInputs,
        DynamicPluginTensorDesc const* /*out*/, int32_t /*nbOutputs*/) noexcept override
    {
        mHasSkipScale = nbInputs == 4;
        return 0;
    }

    int32_t onShapeChange(PluginTensorDesc const* /*in*/, int32_t nbInputs, PluginTensorDesc const* /*out*/,
        int32_t /*nbOutputs*/) noexcept override
    {
        mHasSkipScale = nbInputs == 4; // the runtime clone is never configured, only shape-changed
        return 0;
    }

protected:
    void addFields(std::vector<PluginField>& /*fields*/) override
    {
        // TokenScatter has no attributes; the optional skip_scale input is seen at configure time
    }

private:
    bool mHasSkipScale{false};
};

// ---- VisualScore: (q, k, positions, vis_start) -> scores [n_vis] float32 ------------------------------
class VisualScorePlugin final : public RoutingPlugin
{
public:
    VisualScorePlugin(int32_t nVis, std::string queryRows, std::string headReduction, std::string combine, float scale)
        : mNVis(nVis)
        , mQueryRows(std::move(queryRows))
        , mHeadReduction(std::move(headReduction))
        , mCombine(std::move(combine))
        , mScale(scale)
        , mQueryRowsIndex(choice(mQueryRows, kQueryRows, "query_rows"))
        , mHeadReductionIndex(choice(mHeadReduction, kHeadReductions, "head_reduction"))
        , mCombineIndex(choice(mCombine, kCombines, "combine"))
    {
        if (nVis <= 0)
            throw std::runtime_error("VisualScore needs n_vis > 0");
    }

    AsciiChar const* getPluginName() const noexcept override
    {
        return "VisualScore";
    }

    IPluginV3* clone() noexcept override
    {
        try
        {
            return new VisualScorePlugin(mNVis, mQueryRows, mHeadReduction, mCombine, mScale);
        }
        catch (...)
        {
            return nullptr;
        }
    }

    int32_t getNbOutputs() const noexcept override
    {
        return 1;
    }

    int32_t getOutputDataTypes(DataType* outputTypes, int32_t nbOutputs, DataType const* /*inputTypes*/,
        int32_t nbInputs) const noexcept override
    {
        if (nbInputs != 4 || nbOutputs != 1)
            return -1;
        outputTypes[0] = DataType::kFLOAT; // rankings are float32 whatever the graph's dtype
        return 0;
    }

    int32_t getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const* /*shapeInputs*/,
        int32_t /*nbShapeInputs*/, DimsExprs* outputs, int32_t nbOutputs, IExprBuilder& exprBuilder) noexcept override
    {
        if (nbInputs != 4 || nbOutputs != 1 || inputs[0].nbDims != 4 || inputs[1].nbDims != 4)
            return -1;
        outputs[0].nbDims = 1;
        outputs[0].d[0] = exprBuilder.constant(mNVis);
        return 0;
    }

    bool supportsFormatCombination(
        int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t /*nbInputs*/, int32_t /*nbOutputs*/) noexcept override
    {
        PluginTensorDesc const& desc = inOut[pos].desc;
        if (desc.format != TensorFormat::kLINEAR)
            return false;
        switch (pos)
        {
        case 0: return isActivation(desc.type);               // q
        case 1: return desc.type == inOut[0].desc.type;       // k
        case 2: case 3: return desc.type == DataType::kINT64; // positions, vis_start
        case 4: return desc.type == DataType::kFLOAT;         // scores
        default: return false;
        }
    }

    int32_t configurePlugin(DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const* /*out*/,
        int32_t /*nbOutputs*/) noexcept override
    {
        (void) in; // the tiled kernel has no sequence-length limit
        return nbInputs == 4 ? 0 : -1;
    }

    size_t getWorkspaceSize(DynamicPluginTensorDesc const* inputs, int32_t /*nbInputs*/,
        DynamicPluginTensorDesc const* /*outputs*/, int32_t /*nbOutputs*/) const noexcept override
    {
        return mllm_visual_score_workspace(inputs[0].max.d[2], mNVis); // [q rows + spare rows, n_vis] floats
    }

    int32_t enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* /*outputDesc*/,
        void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept override
    {
        Dims const& q = inputDesc[0].dims; // [1, heads, q_len, head_dim]
        Dims const& k = inputDesc[1].dims; // [1, kv_heads, seq_len, head_dim]
        return kernelStatus("VisualScore",
            mllm_visual_score(inputs[0], inputs[1], static_cast<int64_t const*>(inputs[2]),
                static_cast<int64_t const*>(inputs[3]), static_cast<float*>(outputs[0]), q.d[1], k.d[1], q.d[2], k.d[2],
                q.d[3], mNVis, mQueryRowsIndex, mHeadReductionIndex, mCombineIndex, mScale,
                kernelDtype(inputDesc[0].type), workspace, stream));
    }

protected:
    void addFields(std::vector<PluginField>& fields) override
    {
        fields.emplace_back("n_vis", &mNVis, PluginFieldType::kINT32, 1);
        fields.emplace_back("query_rows", mQueryRows.c_str(), PluginFieldType::kCHAR,
            static_cast<int32_t>(mQueryRows.size()));
        fields.emplace_back("head_reduction", mHeadReduction.c_str(), PluginFieldType::kCHAR,
            static_cast<int32_t>(mHeadReduction.size()));
        fields.emplace_back("combine", mCombine.c_str(), PluginFieldType::kCHAR, static_cast<int32_t>(mCombine.size()));
        fields.emplace_back("scale", &mScale, PluginFieldType::kFLOAT32, 1);
    }

private:
    int32_t mNVis;
    std::string mQueryRows;
    std::string mHeadReduction;
    std::string mCombine;
    float mScale;
    int32_t mQueryRowsIndex;
    int32_t mHeadReductionIndex;
    int32_t mCombineIndex;
};

// ---- creators ---------------------------------------------------------------------------------------
using Factory = IPluginV3* (*) (PluginFieldCollection const*);

IPluginV3* makeTokenSelect(PluginFieldCollection const* fc)
{
    return new TokenSelectPlugin(intField(fc, "k"), intField(fc, "n_vis"));
}

IPluginV3* makeTokenScatter(PluginFieldCollection const* /*fc*/)
{
    return new TokenScatterPlugin();
}

IPluginV3* makeVisualScore(PluginFieldCollection const* fc)
{
    return new VisualScorePlugin(intField(fc, "n_vis"), stringField(fc, "query_rows"),
        stringField(fc, "head_reduction"), stringField(fc, "combine"), floatField(fc, "scale"));
}

class RoutingCreator final : public IPluginCreatorV3One
{
public:
    RoutingCreator(char const* name, std::vector<PluginField> fieldNames, Factory factory)
        : mName(name)
        , mFieldNames(std::move(fieldNames))
        , mFactory(factory)
    {
        mCollection.nbFields = static_cast<int32_t>(mFieldNames.size());
        mCollection.fields = mFieldNames.data();
    }

    AsciiChar const* getPluginName() const noexcept override
    {
        return mName;
    }

    AsciiChar const* getPluginVersion() const noexcept override
    {
        return kPluginVersion;
    }

    AsciiChar const* getPluginNamespace() const noexcept override
    {
        return kPluginNamespace;
    }

    PluginFieldCollection const* getFieldNames() noexcept override
    {
        return &mCollection;
    }

    IPluginV3* createPlugin(AsciiChar const* /*name*/, PluginFieldCollection const* fc, TensorRTPhase /*phase*/) noexcept override
    {
        try
        {
            return mFactory(fc);
        }
        catch (std::exception const& error)
        {
            logError(std::string(mName) + ": " + error.what());
        }
        catch (...)
        {
            logError(std::string(mName) + ": unknown error while creating the plugin");
        }
        return nullptr;
    }

private:
    char const* mName;
    std::vector<PluginField> mFieldNames;
    PluginFieldCollection mCollection{};
    Factory mFactory;
};

// Attribute names and types of each op: keep in step with plugins/trt_fields.py (FIELD_TYPES).
RoutingCreator& tokenSelectCreator()
{
    static RoutingCreator creator("TokenSelect",
        {PluginField("k", nullptr, PluginFieldType::kINT32, 1), PluginField("n_vis", nullptr, PluginFieldType::kINT32, 1)},
        makeTokenSelect);
    return creator;
}

RoutingCreator& tokenScatterCreator()
{
    static RoutingCreator creator("TokenScatter", {}, makeTokenScatter);
    return creator;
}

RoutingCreator& visualScoreCreator()
{
    static RoutingCreator creator("VisualScore",
        {PluginField("n_vis", nullptr, PluginFieldType::kINT32, 1),
            PluginField("query_rows", nullptr, PluginFieldType::kCHAR, 0),
            PluginField("head_reduction", nullptr, PluginFieldType::kCHAR, 0),
            PluginField("combine", nullptr, PluginFieldType::kCHAR, 0),
            PluginField("scale", nullptr, PluginFieldType::kFLOAT32, 1)},
        makeVisualScore);
    return creator;
}
} // namespace
} // namespace mllm_trt

// ---- library entry points (IPluginRegistry::loadLibrary, trtexec --dynamicPlugins) ------------------
extern "C" {

// The TensorRT major version whose headers this library was compiled against. 11.x changed the ILogger
// and ILoggerFinder ABI, so build-mllm reads this before loading the library and refuses a mismatch.
__attribute__((visibility("default"))) int32_t mllm_trt_plugins_tensorrt_major()
{
    return NV_TENSORRT_MAJOR;
}

__attribute__((visibility("default"))) void setLoggerFinder(nvinfer1::ILoggerFinder* finder)
{
    mllm_trt::gLoggerFinder = finder;
}

__attribute__((visibility("default"))) nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators)
{
    static nvinfer1::IPluginCreatorInterface* const creators[] = {
        &mllm_trt::tokenSelectCreator(), &mllm_trt::tokenScatterCreator(), &mllm_trt::visualScoreCreator()};
    nbCreators = 3;
    return creators;
}

} // extern "C"
